/* Spins forever (a volatile counter keeps the optimizer from removing the loop). */
int main(void) {
    volatile unsigned long spins = 0;
    for (;;) {
        spins++;
    }
}
