/* ws_v2.c - placeholder until its owner writes it. */
#include "api.h"
