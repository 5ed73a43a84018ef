/* Prints argv[1] on stdout and exits with the status given as argv[2]. */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc > 1) {
        printf("%s\n", argv[1]);
    }
    return argc > 2 ? atoi(argv[2]) : 0;
}
