/* auth.c - placeholder until its owner writes it. */
#include <ezproxy/services.h>
