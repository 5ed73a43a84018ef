/* Without arguments: prints the whole environment, one NAME=value per line.
 * With arguments: prints each named variable's value, or "<unset>". */
#include <stdio.h>
#include <stdlib.h>

extern char **environ;

int main(int argc, char **argv) {
    if (argc < 2) {
        for (char **e = environ; *e != NULL; e++) {
            puts(*e);
        }
        return 0;
    }
    for (int i = 1; i < argc; i++) {
        const char *value = getenv(argv[i]);
        puts(value != NULL ? value : "<unset>");
    }
    return 0;
}
