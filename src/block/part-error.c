/* part-error.c: the PART_ERROR domain, which windows and splits report in.
 *
 * Alone in its object file on purpose: src/part/error.c defines the same
 * quark, and a static link pulls whichever object comes first and never
 * both (each defines nothing else).
 */
#include "config.h"

#include "nbdfs/partition.h"

G_DEFINE_QUARK(nbdfs-part-error-quark, part_error)
