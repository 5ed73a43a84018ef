/* The pod sandbox's process for the CRI tests (the role of Kubernetes' pause image).
 *
 * Linked statically, so the image holds this one file. It waits in pause() for signals:
 * SIGTERM or SIGINT end it with status 0, SIGCHLD reaps every exited child (in a pod that
 * shares its PID namespace it is PID 1, and orphans are re-parented to it). */
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    int saved = errno;
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

static int handle(int sig, void (*handler)(int), int flags) {
    struct sigaction action;
    action.sa_handler = handler;
    action.sa_flags = flags;
    sigemptyset(&action.sa_mask);
    return sigaction(sig, &action, NULL);
}

int main(void) {
    if (handle(SIGTERM, stop, 0) || handle(SIGINT, stop, 0) ||
        handle(SIGCHLD, reap, SA_NOCLDSTOP | SA_RESTART)) {
        static const char msg[] = "pause: sigaction failed\n";
        (void)!write(2, msg, sizeof msg - 1);
        return 1;
    }
    for (;;) {
        pause();
    }
}
