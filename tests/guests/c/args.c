/* Prints argc, then each argv entry (argv[0] included) on its own line. */
#include <stdio.h>

int main(int argc, char **argv) {
    printf("%d\n", argc);
    for (int i = 0; i < argc; i++) {
        printf("%s\n", argv[i]);
    }
    return 0;
}
