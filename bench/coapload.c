/* CoAP load generator for bench/coap.py (compiled by it with the system cc; not installed).
 *
 *   coapload HOST PORT PATH REQUESTS CONCURRENCY PAYLOAD_HEX CONTENT_FORMAT
 *            [TRIES [OFFSET IDS_FILE]]
 *
 * Keeps CONCURRENCY confirmable POSTs of PAYLOAD to coap://HOST:PORT/PATH in flight from one
 * UDP socket until REQUESTS have been answered (or given up after 4 tries, 2 s apart, like a
 * device: RFC 7252 ACK_TIMEOUT). A piggybacked answer is matched by message ID, a separate
 * one by token (and acknowledged). Prints one line:
 *   ok=N fail=N elapsed=S p50=MS p99=MS p999=MS max=MS codes=2.04:N,...
 * where ok counts 2.xx answers and the percentiles are over them. TRIES (default 4) bounds
 * the sends of one request. With OFFSET, the 4 bytes at that offset of the payload are
 * replaced by the request's number (big-endian; a CBOR uint32 placeholder, 0x1a + 4 bytes)
 * and the numbers answered 2.xx are written to IDS_FILE, one a line (durability tests).
 * SIGTERM: no new requests; those in flight are waited for, then the line is printed. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RETRANSMIT_NS 2000000000LL

struct slot {
    int active;
    uint16_t mid;
    uint16_t seq;
    int tries;
    long id;
    long long t0, sent;
    unsigned char msg[2048];
    int len;
};

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp_ll(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

static int codes[256];
static volatile sig_atomic_t stopping;

static void on_term(int sig) { (void)sig; stopping = 1; }
static int timeouts;

int main(int argc, char **argv) {
    if (argc != 8 && argc != 9 && argc != 11) {
        fprintf(stderr, "usage: %s HOST PORT PATH REQUESTS CONCURRENCY PAYLOAD_HEX CF "
                        "[TRIES [OFFSET IDS_FILE]]\n", argv[0]);
        return 2;
    }
    int max_tries = argc >= 9 ? atoi(argv[8]) : 4;
    long offset = argc == 11 ? atol(argv[9]) : -1;
    FILE *ids = argc == 11 ? fopen(argv[10], "w") : NULL;
    if (argc == 11 && !ids) { perror("IDS_FILE"); return 2; }
    const char *host = argv[1], *port = argv[2], *path = argv[3];
    long requests = atol(argv[4]);
    int conc = atoi(argv[5]);
    const char *hex = argv[6];
    int cf = atoi(argv[7]);
    size_t plen = strlen(hex) / 2;
    unsigned char *payload = malloc(plen + 1);
    for (size_t i = 0; i < plen; i++) sscanf(hex + 2 * i, "%2hhx", &payload[i]);

    struct addrinfo hints = {0}, *ai;
    hints.ai_socktype = SOCK_DGRAM;
    if (getaddrinfo(host, port, &hints, &ai) != 0) { perror("getaddrinfo"); return 2; }
    int fd = socket(ai->ai_family, SOCK_DGRAM, 0);
    if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) { perror("socket"); return 2; }
    int rcv = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);

    struct slot *slots = calloc(conc, sizeof *slots);
    static int16_t by_mid[65536];
    memset(by_mid, 0xff, sizeof by_mid);
    long long *lat = malloc(sizeof(long long) * (requests + 1));
    long started = 0, done = 0, ok = 0, fail = 0;
    uint16_t mid = (uint16_t)(getpid() * 7919);
    size_t seglen = strlen(path);

    signal(SIGTERM, on_term);
    long long t_start = now_ns();
    for (;;) {
        /* fill free slots */
        if (stopping && requests > started) requests = started; /* drain, then stop */
        for (int i = 0; i < conc && started < requests; i++) {
            struct slot *s = &slots[i];
            if (s->active) continue;
            s->active = 1;
            s->mid = mid++;
            s->seq++;
            s->tries = 1;
            unsigned char *m = s->msg;
            int n = 0;
            m[n++] = 0x44; /* ver 1, CON, TKL 4 */
            m[n++] = 0x02; /* POST */
            m[n++] = s->mid >> 8;
            m[n++] = s->mid & 0xff;
            m[n++] = i >> 8; m[n++] = i & 0xff; m[n++] = s->seq >> 8; m[n++] = s->seq & 0xff;
            if (seglen < 13) m[n++] = 0xB0 | seglen;           /* Uri-Path */
            else { m[n++] = 0xBD; m[n++] = seglen - 13; }
            memcpy(m + n, path, seglen); n += seglen;
            if (cf < 256) { m[n++] = 0x11; m[n++] = cf; }        /* Content-Format */
            else { m[n++] = 0x12; m[n++] = cf >> 8; m[n++] = cf & 0xff; }
            m[n++] = 0xff;
            memcpy(m + n, payload, plen);
            s->id = started;
            if (offset >= 0 && offset + 4 <= (long)plen) {
                m[n + offset] = started >> 24; m[n + offset + 1] = started >> 16;
                m[n + offset + 2] = started >> 8; m[n + offset + 3] = started;
            }
            n += plen;
            s->len = n;
            by_mid[s->mid] = i;
            s->t0 = s->sent = now_ns();
            send(fd, s->msg, s->len, 0);
            started++;
        }
        if (done >= requests) break;
        struct pollfd p = {fd, POLLIN, 0};
        int r = poll(&p, 1, 20);
        long long t = now_ns();
        if (r > 0) {
            unsigned char buf[2048];
            for (;;) {
                ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
                if (n < 0) break;
                if (n < 4) continue;
                int type = (buf[0] >> 4) & 3, tkl = buf[0] & 0xf, code = buf[1];
                uint16_t rmid = buf[2] << 8 | buf[3];
                if (code == 0) continue; /* empty ACK: a separate response follows */
                int i = -1;
                if (type == 2 && by_mid[rmid] >= 0) i = by_mid[rmid];
                else if (tkl == 4 && n >= 8) {
                    int cand = buf[4] << 8 | buf[5];
                    uint16_t seq = buf[6] << 8 | buf[7];
                    if (cand < conc && slots[cand].active && slots[cand].seq == seq) i = cand;
                }
                if (type == 0) { /* separate CON response: acknowledge it */
                    unsigned char ack[4] = {0x60, 0, buf[2], buf[3]};
                    send(fd, ack, 4, 0);
                }
                if (i < 0 || !slots[i].active) continue;
                struct slot *s = &slots[i];
                s->active = 0;
                by_mid[s->mid] = -1;
                codes[code]++;
                if (code >> 5 == 2) {
                    lat[ok++] = t - s->t0;
                    if (ids) fprintf(ids, "%ld\n", s->id);
                } else fail++;
                done++;
            }
        }
        for (int i = 0; i < conc; i++) {
            struct slot *s = &slots[i];
            if (!s->active || t - s->sent < RETRANSMIT_NS) continue;
            if (s->tries >= max_tries) {
                s->active = 0;
                by_mid[s->mid] = -1;
                timeouts++;
                fail++;
                done++;
                continue;
            }
            s->tries++;
            s->sent = t;
            send(fd, s->msg, s->len, 0);
        }
    }
    double elapsed = (now_ns() - t_start) / 1e9;
    qsort(lat, ok, sizeof *lat, cmp_ll);
#define PCT(q) (ok ? lat[(long)((q) * ok) < ok ? (long)((q) * ok) : ok - 1] / 1e6 : 0.0)
    printf("ok=%ld fail=%ld elapsed=%.6f p50=%.3f p99=%.3f p999=%.3f max=%.3f codes=", ok, fail,
           elapsed, PCT(0.5), PCT(0.99), PCT(0.999), ok ? lat[ok - 1] / 1e6 : 0.0);
    int first = 1;
    for (int c = 0; c < 256; c++)
        if (codes[c]) { printf("%s%d.%02d:%d", first ? "" : ",", c >> 5, c & 31, codes[c]); first = 0; }
    if (timeouts) printf("%stimeout:%d", first ? "" : ",", timeouts);
    printf("\n");
    if (ids) fclose(ids);
    return 0;
}
