/* The ext_proc floor: the cheapest ext_proc server we can build, to measure what Envoy's
 * ext_proc round trip costs by itself (aibench/floor.py; docs/benchmarks.md).
 *
 * Not part of ai-lb. One thread, epoll, nghttp2 (Debian's libnghttp2) for HTTP/2. It
 * answers every ext_proc message on /envoy.service.ext_proc.v3.ExternalProcessor/Process
 * with the next of the prebuilt answers read from ANSWERS (each a gRPC-framed, serialized
 * ProcessingResponse that names one backend, tagged like ai-lb's, so that Envoy's
 * override_host routes the request there and its access log sends an entry), ends the
 * call with grpc-status 0, reads and drops access-log entries, and answers gRPC health
 * checks SERVING. It parses no protobuf and decides nothing: what Envoy plus one loopback
 * hop to a process cost, without ai-lb's work.
 *
 *     cc -O2 -o extproc_floor extproc_floor.c -lnghttp2
 *     extproc_floor PORT ANSWERS       (ANSWERS: 4-byte big-endian length + a gRPC message, repeated)
 *
 * Binds 127.0.0.1 only. Exits on SIGTERM. Logs to stderr only what goes wrong (a GOAWAY it
 * sends, an HTTP/2 error): a floor that drops calls would make Envoy fail open and look fast.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_ANSWERS 64
#define MAX_CONNS 256
#define MAX_MSG (16 << 20)

enum kind { K_OTHER, K_PROCESS, K_LOG, K_HEALTH };

typedef struct {
  const uint8_t *data;
  size_t len, off;
} out_t;

typedef struct stream {
  int32_t id;
  enum kind kind;
  uint8_t *buf; /* request bytes not yet a whole gRPC message */
  size_t len, cap;
  out_t out;    /* the answer being sent (static: prebuilt) */
} stream_t;

typedef struct {
  int fd;
  nghttp2_session *s;
} conn_t;

static uint8_t *answers[MAX_ANSWERS];
static size_t answer_len[MAX_ANSWERS];
static int n_answers, next_answer;
static uint8_t health_msg[] = {0, 0, 0, 0, 2, 0x08, 0x01}; /* HealthCheckResponse{status: SERVING} */
static volatile sig_atomic_t stop;

static void on_term(int sig) { (void)sig; stop = 1; }

static ssize_t read_out(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t len, uint32_t *flags,
                        nghttp2_data_source *src, void *user) {
  (void)user;
  out_t *o = src->ptr;
  size_t n = o->len - o->off;
  if (n > len) n = len;
  memcpy(buf, o->data + o->off, n);
  o->off += n;
  if (o->off == o->len) {
    *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
    nghttp2_nv t[] = {{(uint8_t *)"grpc-status", (uint8_t *)"0", 11, 1, NGHTTP2_NV_FLAG_NONE}};
    nghttp2_submit_trailer(s, sid, t, 1);
  }
  return (ssize_t)n;
}

/* Answer the call with ``msg``, a whole gRPC message (length prefix included), then OK. */
static void answer(nghttp2_session *s, stream_t *st, const uint8_t *msg, size_t len) {
  st->out.data = msg;
  st->out.len = len;
  st->out.off = 0;
  nghttp2_nv h[] = {{(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE},
                    {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16, NGHTTP2_NV_FLAG_NONE}};
  nghttp2_data_provider p;
  p.source.ptr = &st->out;
  p.read_callback = read_out;
  nghttp2_submit_response(s, st->id, h, 2, &p);
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *user) {
  (void)user;
  if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  stream_t *st = calloc(1, sizeof *st);
  st->id = f->hd.stream_id;
  nghttp2_session_set_stream_user_data(s, st->id, st);
  return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t nl,
                     const uint8_t *value, size_t vl, uint8_t flags, void *user) {
  (void)flags;
  (void)user;
  stream_t *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
  if (st == NULL || nl != 5 || memcmp(name, ":path", 5) != 0) return 0;
  if (vl >= 8 && memcmp(value + vl - 8, "/Process", 8) == 0) st->kind = K_PROCESS;
  else if (vl >= 17 && memcmp(value + vl - 17, "/StreamAccessLogs", 17) == 0) st->kind = K_LOG;
  else if (vl >= 6 && memcmp(value + vl - 6, "/Check", 6) == 0) st->kind = K_HEALTH;
  return 0;
}

static int on_data(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len, void *user) {
  (void)flags;
  (void)user;
  stream_t *st = nghttp2_session_get_stream_user_data(s, sid);
  if (st == NULL || st->kind == K_LOG || st->kind == K_OTHER) return 0; /* dropped */
  if (st->len + len > MAX_MSG) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
  if (st->len + len > st->cap) {
    st->cap = (st->len + len) * 2;
    st->buf = realloc(st->buf, st->cap);
  }
  memcpy(st->buf + st->len, data, len);
  st->len += len;
  while (st->len >= 5) {
    size_t m = (size_t)st->buf[1] << 24 | (size_t)st->buf[2] << 16 | (size_t)st->buf[3] << 8 | st->buf[4];
    if (st->len < 5 + m) break;
    memmove(st->buf, st->buf + 5 + m, st->len - 5 - m);
    st->len -= 5 + m;
    if (st->kind == K_HEALTH) {
      answer(s, st, health_msg, sizeof health_msg);
    } else {
      int i = next_answer++ % n_answers;
      answer(s, st, answers[i], answer_len[i]);
    }
  }
  return 0;
}

static int on_close(nghttp2_session *s, int32_t sid, uint32_t code, void *user) {
  (void)code;
  (void)user;
  stream_t *st = nghttp2_session_get_stream_user_data(s, sid);
  if (st != NULL) {
    free(st->buf);
    free(st);
  }
  return 0;
}

static int on_frame_send(nghttp2_session *s, const nghttp2_frame *f, void *user) {
  (void)s;
  (void)user;
  if (f->hd.type == NGHTTP2_GOAWAY)
    fprintf(stderr, "GOAWAY sent: code %u, last stream %d: %.*s\n", f->goaway.error_code, f->goaway.last_stream_id,
            (int)f->goaway.opaque_data_len, f->goaway.opaque_data ? (const char *)f->goaway.opaque_data : "");
  return 0;
}

/* Everything nghttp2 has to send, written out. A peer that stops reading for a second
 * loses its connection: the floor never blocks for longer. */
static int flush_out(conn_t *c) {
  for (;;) {
    const uint8_t *d;
    ssize_t n = nghttp2_session_mem_send(c->s, &d);
    if (n < 0) return -1;
    if (n == 0) return 0;
    ssize_t off = 0;
    while (off < n) {
      ssize_t w = write(c->fd, d + off, (size_t)(n - off));
      if (w >= 0) {
        off += w;
      } else if (errno == EAGAIN) {
        struct pollfd pf = {.fd = c->fd, .events = POLLOUT};
        if (poll(&pf, 1, 1000) <= 0) return -1;
      } else if (errno != EINTR) {
        return -1;
      }
    }
  }
}

static conn_t *open_conn(int fd) {
  conn_t *c = calloc(1, sizeof *c);
  c->fd = fd;
  nghttp2_session_callbacks *cb;
  nghttp2_session_callbacks_new(&cb);
  nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data);
  nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_close);
  nghttp2_session_callbacks_set_on_frame_send_callback(cb, on_frame_send);
  /* Envoy resets every ext_proc stream once it has the answer; nghttp2's rapid-reset guard
   * (1,000 resets, then 33/s) would close the connection after ~1,000 calls. */
  nghttp2_option *opt;
  nghttp2_option_new(&opt);
  nghttp2_option_set_stream_reset_rate_limit(opt, 1u << 30, 1u << 30);
  nghttp2_session_server_new2(&c->s, cb, c, opt);
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cb);
  nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 10000},
                                 {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20}};
  nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, iv, 2);
  nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, 32 << 20);
  return c;
}

static void close_conn(int ep, conn_t *c) {
  epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  nghttp2_session_del(c->s);
  free(c);
}

static int load_answers(const char *path) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) return -1;
  uint8_t h[4];
  while (n_answers < MAX_ANSWERS && fread(h, 1, 4, f) == 4) {
    size_t n = (size_t)h[0] << 24 | (size_t)h[1] << 16 | (size_t)h[2] << 8 | h[3];
    answers[n_answers] = malloc(n);
    if (fread(answers[n_answers], 1, n, f) != n) break;
    answer_len[n_answers++] = n;
  }
  fclose(f);
  return n_answers > 0 ? 0 : -1;
}

int main(int argc, char **argv) {
  if (argc != 3 || load_answers(argv[2]) != 0) {
    fprintf(stderr, "usage: %s PORT ANSWERS\n", argv[0]);
    return 2;
  }
  signal(SIGTERM, on_term);
  signal(SIGINT, on_term);
  signal(SIGPIPE, SIG_IGN);
  int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  int one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)atoi(argv[1]));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 128) != 0) {
    perror("bind");
    return 1;
  }
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
  static uint8_t buf[1 << 16];
  struct epoll_event evs[64];
  while (!stop) {
    int n = epoll_wait(ep, evs, 64, 200);
    for (int i = 0; i < n; i++) {
      conn_t *c = evs[i].data.ptr;
      if (c == NULL) {
        int fd;
        while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
          setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          conn_t *nc = open_conn(fd);
          struct epoll_event e2 = {.events = EPOLLIN, .data.ptr = nc};
          epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e2);
          flush_out(nc);
        }
        continue;
      }
      int dead = 0;
      for (;;) {
        ssize_t r = read(c->fd, buf, sizeof buf);
        if (r > 0) {
          ssize_t rv = nghttp2_session_mem_recv(c->s, buf, (size_t)r);
          if (rv < 0) {
            fprintf(stderr, "HTTP/2 error: %s\n", nghttp2_strerror((int)rv));
            dead = 1;
            break;
          }
          if ((size_t)r < sizeof buf) break;
        } else if (r == 0) {
          dead = 1;
          break;
        } else {
          if (errno != EAGAIN && errno != EINTR) dead = 1;
          break;
        }
      }
      if (!dead && flush_out(c) != 0) dead = 1;
      if (!dead && !nghttp2_session_want_read(c->s) && !nghttp2_session_want_write(c->s)) dead = 1;
      if (dead) close_conn(ep, c);
    }
  }
  return 0;
}
