/* Allocates and touches 1 MiB blocks until malloc fails, then aborts (a trap).
 * The blocks are chained into a list reachable from a volatile global, so the
 * optimizer cannot drop the allocations. */
#include <stdlib.h>
#include <string.h>

static void *volatile head;

int main(void) {
    for (;;) {
        void **block = malloc(1 << 20);
        if (block == NULL) abort();
        memset(block, 0xAB, 1 << 20);
        *block = head;
        head = block;
    }
}
