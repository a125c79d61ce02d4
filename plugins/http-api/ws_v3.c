/* ws_v3.c - placeholder until its owner writes it. */
#include "api.h"
