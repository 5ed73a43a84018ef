/* Executes an `unreachable` instruction. */
int main(void) {
    __builtin_trap();
}
