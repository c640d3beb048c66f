/* error.c: the PART_ERROR domain. */
#include "nbdfs/partition.h"

G_DEFINE_QUARK(nbdfs-part-error-quark, part_error)
