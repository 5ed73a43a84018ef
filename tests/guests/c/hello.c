/* Prints a greeting on stdout and exits 0. */
#include <stdio.h>

int main(void) {
    puts("hello from wasi");
    return 0;
}
