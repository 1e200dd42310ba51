/* vsock-agent: the test guest's clone-aware helper. Prints "vsock: cid=N" on the console when
 * it starts and whenever the guest's vsock CID changes (a restored clone learns its new CID
 * from the TRANSPORT_RESET event the device sends), and answers every connection to vsock
 * port 52 with "cid=N\n", so the host can check which identity answers on its socket.
 * Built static by build-initramfs.sh. */
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static unsigned int local_cid(void) {
    unsigned int cid = VMADDR_CID_ANY;
    int fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) != 0)
            cid = VMADDR_CID_ANY;
        close(fd);
    }
    return cid;
}

int main(void) {
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_port = 52, .svm_cid = VMADDR_CID_ANY};
    int listener = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(listener, 8) != 0) {
        perror("vsock-agent: listen on vsock port 52");
        return 1;
    }
    unsigned int shown = VMADDR_CID_ANY;
    for (;;) {
        unsigned int cid = local_cid();
        if (cid != shown) {
            printf("vsock: cid=%u\n", cid);
            fflush(stdout);
            shown = cid;
        }
        struct pollfd p = {.fd = listener, .events = POLLIN};
        if (poll(&p, 1, 100) > 0) {
            int conn = accept(listener, NULL, NULL);
            if (conn >= 0) {
                dprintf(conn, "cid=%u\n", local_cid());
                close(conn);
            }
        }
    }
}
