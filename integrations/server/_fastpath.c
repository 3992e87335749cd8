/* kvmw serve's compiled path for an engine's small commands: GET, SET and PING.
 *
 * Why: a 4 KiB GET or SET through the Python protocol path costs ~4.6-7 us of
 * interpreter time on top of the ~9 us the kernel spends on its two syscalls,
 * where Redis spends ~2 us (redis-benchmark, 2 cores). This loop takes the
 * whole, simple commands at the start of a read (an array of 1-3 bulk strings
 * naming GET key, SET key value or PING), calls the server's own store methods
 * for each, and frames the replies, so a command costs one Python call (the
 * store's) instead of the parser, the dispatch and the reply builder.
 *
 * It never decides anything the Python path would decide differently: every
 * command it does not take exactly as the Python path would (another command,
 * options, a long key, a TTL in play, a full write-through queue, a frame not
 * whole in this read, a malformed or oversized one) stops it, and the Python
 * path parses from that command on, so replies keep their order and errors
 * their wording. The replies are the Python path's, byte for byte (tested).
 *
 * Built by setup.py as an optional extension: without a C compiler kvmw still
 * installs, and `kvmw serve` runs every command through the Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    PyObject *memory_get; /* name -> value or None: the memory tier */
    PyObject *store_get;  /* name -> value or None, asked after a memory miss; None: no spill */
    PyObject *store_put;  /* (name, value): the tiered store's put */
    PyObject *has_room;   /* nbytes -> bool: the write-through queue; None: no spill */
    PyObject *expiry;     /* the server's TTLs (dict): while any is set, GET/SET go the Python way */
    PyObject *counts;     /* the server's counters (dict): "commands" is kept up */
    PyObject *digest;     /* xxhash.xxh3_64_intdigest */
    Py_ssize_t max_value; /* larger bulks are the Python path's error */
    Py_ssize_t long_key;  /* longer keys are framed with their value: the Python path's */
    Py_ssize_t direct_send; /* values at least this large go out as their own buffer */
    char *scratch;        /* the replies of a run, kept between runs (no allocation per read) */
    Py_ssize_t scratch_cap;
    int running;          /* a run holds `scratch` (a re-entrant one gets a buffer of its own) */
    long long commands;   /* commands this loop has run (INFO: kvmw_fast_path_commands) */
} FastPath;

/* the object fields, listed once for __init__, traverse and clear */
#define FASTPATH_OBJECTS(X) X(memory_get) X(store_get) X(store_put) X(has_room) X(expiry) X(counts) X(digest)

static PyObject *commands_key; /* "commands" */

/* ---- output: small replies in one growing buffer, large values as their own parts ---- */
typedef struct {
    char *data;
    Py_ssize_t len, cap;
    PyObject *parts; /* list, made at the first large value */
} Out;

static int out_reserve(Out *o, Py_ssize_t more)
{
    if (o->len + more <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 16384;
    while (cap < o->len + more)
        cap *= 2;
    char *data = PyMem_Realloc(o->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->data = data;
    o->cap = cap;
    return 0;
}

static int out_write(Out *o, const char *src, Py_ssize_t n)
{
    if (out_reserve(o, n) < 0)
        return -1;
    memcpy(o->data + o->len, src, (size_t)n);
    o->len += n;
    return 0;
}

/* The buffer so far becomes a part of its own (before a large value). */
static int out_cut(Out *o)
{
    if (o->parts == NULL && (o->parts = PyList_New(0)) == NULL)
        return -1;
    if (o->len) {
        PyObject *b = PyBytes_FromStringAndSize(o->data, o->len);
        if (b == NULL || PyList_Append(o->parts, b) < 0) {
            Py_XDECREF(b);
            return -1;
        }
        Py_DECREF(b);
        o->len = 0;
    }
    return 0;
}

/* bytes (no large value), a list of parts, or None (nothing to send) */
static PyObject *out_finish(Out *o)
{
    if (o->parts == NULL) {
        if (o->len == 0)
            Py_RETURN_NONE;
        return PyBytes_FromStringAndSize(o->data, o->len);
    }
    if (out_cut(o) < 0)
        return NULL;
    Py_INCREF(o->parts);
    return o->parts;
}

/* ---- parsing: "*N\r\n" then N x "$len\r\n<bytes>\r\n", N in 1..3, whole in [p, end) ---- */
typedef struct {
    const char *ptr;
    Py_ssize_t len;
} Arg;

/* the decimal number and CRLF at p; NULL: incomplete or not a number (the Python path decides) */
static const char *read_number(const char *p, const char *end, Py_ssize_t *out)
{
    Py_ssize_t n = 0;
    const char *start = p;
    while (p < end && *p >= '0' && *p <= '9') {
        if (p - start >= 18)
            return NULL;
        n = n * 10 + (*p - '0');
        p++;
    }
    if (p == start || end - p < 2 || p[0] != '\r' || p[1] != '\n')
        return NULL;
    *out = n;
    return p + 2;
}

/* one whole command at p: its arguments and where it ends; NULL: not one the loop takes */
static const char *read_command(const char *p, const char *end, Py_ssize_t max_value, Arg *args, int *nargs)
{
    Py_ssize_t n, len;
    if (p >= end || *p != '*' || (p = read_number(p + 1, end, &n)) == NULL || n < 1 || n > 3)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p >= end || *p != '$' || (p = read_number(p + 1, end, &len)) == NULL || len > max_value)
            return NULL;
        if (end - p < len + 2 || p[len] != '\r' || p[len + 1] != '\n')
            return NULL;
        args[i].ptr = p;
        args[i].len = len;
        p += len + 2;
    }
    *nargs = (int)n;
    return p;
}

/* `a` is the command `upper` in any case */
static int is_command(const Arg *a, const char *upper, Py_ssize_t n)
{
    if (a->len != n)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if ((a->ptr[i] & ~0x20) != upper[i])
            return 0;
    return 1;
}

/* The store's name of a key: the Python path's store_key (16 hex chars of xxh3-64, then the
 * key in hex) for keys up to long_key bytes. */
static PyObject *store_name(FastPath *self, const Arg *key)
{
    static const char hex[] = "0123456789abcdef";
    PyObject *raw = PyBytes_FromStringAndSize(key->ptr, key->len);
    if (raw == NULL)
        return NULL;
    PyObject *d = PyObject_CallOneArg(self->digest, raw);
    Py_DECREF(raw);
    if (d == NULL)
        return NULL;
    unsigned long long h = PyLong_AsUnsignedLongLong(d);
    Py_DECREF(d);
    if (h == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    PyObject *name = PyUnicode_New(16 + 2 * key->len, 127);
    if (name == NULL)
        return NULL;
    Py_UCS1 *s = PyUnicode_1BYTE_DATA(name);
    for (int i = 15; i >= 0; i--, h >>= 4)
        s[i] = (Py_UCS1)hex[h & 15];
    for (Py_ssize_t i = 0; i < key->len; i++) {
        unsigned char c = (unsigned char)key->ptr[i];
        s[16 + 2 * i] = (Py_UCS1)hex[c >> 4];
        s[17 + 2 * i] = (Py_UCS1)hex[c & 15];
    }
    return name;
}

/* "$<n>\r\n" into head (at least 24 bytes); its length (snprintf costs more than the GET) */
static int bulk_header(char *head, Py_ssize_t n)
{
    char digits[20];
    int len = 0, at = 0;
    do {
        digits[len++] = (char)('0' + n % 10);
        n /= 10;
    } while (n > 0);
    head[at++] = '$';
    while (len > 0)
        head[at++] = digits[--len];
    head[at++] = '\r';
    head[at++] = '\n';
    return at;
}

/* a bulk reply of `value` (any buffer), or the null reply */
static int reply_bulk(FastPath *self, Out *o, PyObject *value)
{
    char head[24];
    if (value == Py_None)
        return out_write(o, "$-1\r\n", 5);
    Py_buffer view;
    if (PyObject_GetBuffer(value, &view, PyBUF_SIMPLE) < 0)
        return -1;
    int n = bulk_header(head, view.len);
    int rc = 0;
    if (view.len < self->direct_send) {
        rc = (out_write(o, head, n) < 0 || out_write(o, view.buf, view.len) < 0 || out_write(o, "\r\n", 2) < 0) ? -1 : 0;
    } else { /* the value goes out from its own buffer (RespConnection.flush: writev) */
        if (out_write(o, head, n) < 0 || out_cut(o) < 0 || PyList_Append(o->parts, value) < 0 ||
            out_write(o, "\r\n", 2) < 0)
            rc = -1;
    }
    PyBuffer_Release(&view);
    return rc;
}

/* 1: GET done; 0: not taken (the Python path runs it); -1: error */
static int run_get(FastPath *self, Out *o, const Arg *key)
{
    if (key->len > self->long_key || PyDict_GET_SIZE(self->expiry))
        return 0;
    PyObject *name = store_name(self, key);
    if (name == NULL)
        return -1;
    PyObject *value = PyObject_CallOneArg(self->memory_get, name);
    if (value == Py_None && self->store_get != Py_None) {
        Py_DECREF(value);
        value = PyObject_CallOneArg(self->store_get, name);
    }
    Py_DECREF(name);
    if (value == NULL)
        return -1;
    int rc = reply_bulk(self, o, value);
    Py_DECREF(value);
    return rc < 0 ? -1 : 1;
}

static int run_set(FastPath *self, Out *o, const Arg *key, const Arg *val)
{
    if (key->len > self->long_key || PyDict_GET_SIZE(self->expiry))
        return 0;
    if (self->has_room != Py_None) { /* a full queue: the Python path waits for room (backpressure) */
        PyObject *nbytes = PyLong_FromSsize_t(val->len);
        if (nbytes == NULL)
            return -1;
        PyObject *ok = PyObject_CallOneArg(self->has_room, nbytes);
        Py_DECREF(nbytes);
        if (ok == NULL)
            return -1;
        int room = PyObject_IsTrue(ok);
        Py_DECREF(ok);
        if (room <= 0)
            return room;
    }
    PyObject *name = store_name(self, key);
    if (name == NULL)
        return -1;
    PyObject *value = PyBytes_FromStringAndSize(val->ptr, val->len);
    if (value == NULL) {
        Py_DECREF(name);
        return -1;
    }
    PyObject *args[2] = {name, value};
    PyObject *r = PyObject_Vectorcall(self->store_put, args, 2, NULL);
    Py_DECREF(name);
    Py_DECREF(value);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return out_write(o, "+OK\r\n", 5) < 0 ? -1 : 1;
}

static int count_commands(FastPath *self, long n)
{
    PyObject *old = PyDict_GetItemWithError(self->counts, commands_key);
    if (old == NULL && PyErr_Occurred())
        return -1;
    PyObject *now = PyLong_FromLong((old ? PyLong_AsLong(old) : 0) + n);
    if (now == NULL)
        return -1;
    int rc = PyDict_SetItem(self->counts, commands_key, now);
    Py_DECREF(now);
    return rc;
}

PyDoc_STRVAR(run_doc,
"run(buffer, start, end) -> (stop, replies)\n\n"
"Runs the whole GET/SET/PING commands in buffer[start:end] up to the first it does not\n"
"take; `stop` is that command's offset (`end`: all were run), `replies` their replies\n"
"(bytes, a list of buffers when a large value is among them, or None).");

static PyObject *FastPath_run(FastPath *self, PyObject *const *argv, Py_ssize_t argc)
{
    Py_ssize_t start, end;
    if (argc != 3) {
        PyErr_SetString(PyExc_TypeError, "run(buffer, start, end)");
        return NULL;
    }
    if ((start = PyLong_AsSsize_t(argv[1])) == -1 && PyErr_Occurred())
        return NULL;
    if ((end = PyLong_AsSsize_t(argv[2])) == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(argv[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (start < 0 || end > buf.len || start > end) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "start/end outside the buffer");
        return NULL;
    }
    const char *base = buf.buf, *p = base + start, *stop = base + end;
    Out o = {NULL, 0, 0, NULL};
    int own_scratch = !self->running;
    if (own_scratch) {
        o.data = self->scratch;
        o.cap = self->scratch_cap;
        self->running = 1;
    }
    long ran = 0;
    int rc = 1;
    while (p < stop) {
        Arg a[3];
        int n;
        const char *next = read_command(p, stop, self->max_value, a, &n);
        if (next == NULL)
            break;
        if (n == 2 && is_command(&a[0], "GET", 3))
            rc = run_get(self, &o, &a[1]);
        else if (n == 3 && is_command(&a[0], "SET", 3))
            rc = run_set(self, &o, &a[1], &a[2]);
        else if (n == 1 && is_command(&a[0], "PING", 4))
            rc = out_write(&o, "+PONG\r\n", 7) < 0 ? -1 : 1;
        else
            rc = 0;
        if (rc <= 0)
            break;
        ran++;
        p = next;
    }
    PyBuffer_Release(&buf);
    PyObject *replies = NULL;
    self->commands += ran;
    if (rc >= 0 && (ran == 0 || count_commands(self, ran) == 0))
        replies = out_finish(&o);
    if (own_scratch) { /* kept (and grown) for the next run */
        self->scratch = o.data;
        self->scratch_cap = o.cap;
        self->running = 0;
    } else {
        PyMem_Free(o.data);
    }
    Py_XDECREF(o.parts);
    if (replies == NULL)
        return NULL;
    PyObject *result = Py_BuildValue("(nN)", (Py_ssize_t)(p - base), replies);
    return result;
}

static int FastPath_init(FastPath *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"memory_get", "store_get", "store_put", "has_room", "expiry", "counts",
                             "digest", "max_value", "long_key", "direct_send", NULL};
    PyObject *memory_get, *store_get, *store_put, *has_room, *expiry, *counts, *digest;
    Py_ssize_t max_value, long_key, direct_send;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO!O!Onnn", kwlist, &memory_get, &store_get, &store_put,
                                     &has_room, &PyDict_Type, &expiry, &PyDict_Type, &counts, &digest,
                                     &max_value, &long_key, &direct_send))
        return -1;
#define KEEP(field) Py_INCREF(field); Py_XSETREF(self->field, field);
    FASTPATH_OBJECTS(KEEP)
#undef KEEP
    self->max_value = max_value;
    self->long_key = long_key;
    self->direct_send = direct_send;
    return 0;
}

static int FastPath_traverse(FastPath *self, visitproc visit, void *arg)
{
#define VISIT(field) Py_VISIT(self->field);
    FASTPATH_OBJECTS(VISIT)
#undef VISIT
    return 0;
}

static int FastPath_clear(FastPath *self)
{
#define CLEAR(field) Py_CLEAR(self->field);
    FASTPATH_OBJECTS(CLEAR)
#undef CLEAR
    return 0;
}

static void FastPath_dealloc(FastPath *self)
{
    PyObject_GC_UnTrack(self);
    FastPath_clear(self);
    PyMem_Free(self->scratch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef FastPath_members[] = {
    {"commands", T_LONGLONG, offsetof(FastPath, commands), READONLY, "commands this loop has run"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef FastPath_methods[] = {
    {"run", (PyCFunction)(void (*)(void))FastPath_run, METH_FASTCALL, run_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(FastPath_doc,
"FastPath(memory_get, store_get, store_put, has_room, expiry, counts, digest, max_value,\n"
"         long_key, direct_send)\n\n"
"kvmw serve's compiled GET/SET/PING loop over the server's own store methods.");

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmw.integrations.server._fastpath.FastPath",
    .tp_basicsize = sizeof(FastPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = FastPath_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FastPath_init,
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_traverse = (traverseproc)FastPath_traverse,
    .tp_clear = (inquiry)FastPath_clear,
    .tp_methods = FastPath_methods,
    .tp_members = FastPath_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "kvmw serve's compiled GET/SET/PING path.", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&FastPathType) < 0)
        return NULL;
    if (commands_key == NULL && (commands_key = PyUnicode_InternFromString("commands")) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FastPathType);
    if (PyModule_AddObject(m, "FastPath", (PyObject *)&FastPathType) < 0) {
        Py_DECREF(&FastPathType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
