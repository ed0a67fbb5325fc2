// Every kernel for one ISA: compiled once per ISA (see vec.h and the Makefile), each in namespace MST_NS.
#include "attention.h"
#include "embed.h"
#include "linear.h"
#include "probe.h"
#include "qlinear.h"
