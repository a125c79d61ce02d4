/* bodies_old.c - placeholder until its owner writes it. */
#include "api.h"
