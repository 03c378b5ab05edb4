/*
 * The C peer of scripts/bench: the least a libfuse3 low-level server does to
 * serve the bench's tree with klpfs's cache policy, so the bench can show how
 * much of klpfs's time is pyfuse3's and Python's and how much is FUSE's own.
 *
 * It reads a manifest on stdin, one entry per line, parents before children:
 *   d <path>    a directory (mode 0755, size 0)
 *   f <path>    an attribute-like file (mode 0644, size 4096, value "1\n")
 * paths relative to the mount root, '/'-separated.  Entries and attributes
 * are cached for the timeout given on the command line, files are opened
 * direct_io, a write stores its first byte and a newline: what klpfs and the
 * bench's bare pyfuse3 file system do.
 *
 * Build: cc -O2 -o bench-peer bench-peer.c $(pkg-config --cflags --libs fuse3)
 * Run:   bench-peer MOUNTPOINT TIMEOUT -o OPTIONS < manifest   (foreground)
 */
#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct node {
	char *name;
	fuse_ino_t parent;
	int is_dir;
	char value[2];
	fuse_ino_t *children;	/* sorted by name, for bsearch */
	size_t nchildren, cap;
};

static struct node *nodes;	/* nodes[ino], ino 1 is the root */
static size_t nnodes;
static double timeout;

static struct node *node_of(fuse_ino_t ino)
{
	return ino >= 1 && ino < nnodes ? &nodes[ino] : NULL;
}

static int by_name(const void *key, const void *child)
{
	return strcmp(key, nodes[*(const fuse_ino_t *)child].name);
}

static int sort_children(const void *a, const void *b)
{
	return strcmp(nodes[*(const fuse_ino_t *)a].name, nodes[*(const fuse_ino_t *)b].name);
}

static fuse_ino_t child_of(struct node *dir, const char *name)
{
	fuse_ino_t *hit = bsearch(name, dir->children, dir->nchildren, sizeof(*hit), by_name);
	return hit ? *hit : 0;
}

static void fill_stat(fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_mode = nodes[ino].is_dir ? S_IFDIR | 0755 : S_IFREG | 0644;
	st->st_nlink = 1;
	st->st_size = nodes[ino].is_dir ? 0 : 4096;
	st->st_blksize = 4096;
}

static void fill_entry(fuse_ino_t ino, struct fuse_entry_param *e)
{
	memset(e, 0, sizeof(*e));
	e->ino = ino;
	e->attr_timeout = e->entry_timeout = timeout;
	fill_stat(ino, &e->attr);
}

static void peer_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct node *dir = node_of(parent);
	fuse_ino_t ino = dir && dir->is_dir ? child_of(dir, name) : 0;
	struct fuse_entry_param e;

	if (!ino) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fill_entry(ino, &e);
	fuse_reply_entry(req, &e);
}

static void peer_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;

	(void)fi;
	if (!node_of(ino)) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fill_stat(ino, &st);
	fuse_reply_attr(req, &st, timeout);
}

static void peer_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (!node_of(ino) || nodes[ino].is_dir) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	fi->direct_io = 1;
	fuse_reply_open(req, fi);
}

static void peer_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	const char *value = nodes[ino].value;

	(void)fi;
	if (off >= 2)
		fuse_reply_buf(req, NULL, 0);
	else
		fuse_reply_buf(req, value + off, size < (size_t)(2 - off) ? size : (size_t)(2 - off));
}

static void peer_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	(void)off;
	(void)fi;
	if (size)
		nodes[ino].value[0] = buf[0];
	fuse_reply_write(req, size);
}

/* readdir and readdirplus: "." and "..", then the children; plus fills attributes too. */
static void list_dir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, int plus)
{
	struct node *dir = node_of(ino);
	char *buf, *p;
	size_t left = size;

	if (!dir || !dir->is_dir) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	buf = p = malloc(size);
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	for (size_t i = off; i < dir->nchildren + 2; i++) {
		fuse_ino_t child = i == 0 ? ino : i == 1 ? (dir->parent ? dir->parent : 1) : dir->children[i - 2];
		const char *name = i == 0 ? "." : i == 1 ? ".." : nodes[child].name;
		size_t len;

		if (plus) {
			struct fuse_entry_param e;

			fill_entry(child, &e);
			if (i < 2)
				e.ino = 0;	/* no lookup count taken for . and .. */
			len = fuse_add_direntry_plus(req, p, left, name, &e, i + 1);
		} else {
			struct stat st;

			fill_stat(child, &st);
			len = fuse_add_direntry(req, p, left, name, &st, i + 1);
		}
		if (len > left)
			break;
		p += len;
		left -= len;
	}
	fuse_reply_buf(req, buf, size - left);
	free(buf);
}

static void peer_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)fi;
	list_dir(req, ino, size, off, 0);
}

static void peer_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
			     struct fuse_file_info *fi)
{
	(void)fi;
	list_dir(req, ino, size, off, 1);
}

static const struct fuse_lowlevel_ops ops = {
	.lookup = peer_lookup,
	.getattr = peer_getattr,
	.open = peer_open,
	.read = peer_read,
	.write = peer_write,
	.readdir = peer_readdir,
	.readdirplus = peer_readdirplus,
};

static fuse_ino_t add_node(const char *path, int is_dir)
{
	const char *slash = strrchr(path, '/');
	fuse_ino_t parent = 1;
	struct node *n, *p;

	if (slash) {
		char *dirpath = strndup(path, slash - path);
		char *part, *save;

		for (part = strtok_r(dirpath, "/", &save); part && parent; part = strtok_r(NULL, "/", &save)) {
			for (size_t i = 0; i < nodes[parent].nchildren; i++)	/* unsorted while loading */
				if (!strcmp(nodes[nodes[parent].children[i]].name, part)) {
					parent = nodes[parent].children[i];
					goto found;
				}
			parent = 0;
found:;
		}
		free(dirpath);
		if (!parent)
			return 0;
	}
	nodes = realloc(nodes, (nnodes + 1) * sizeof(*nodes));
	n = &nodes[nnodes];
	memset(n, 0, sizeof(*n));
	n->name = strdup(slash ? slash + 1 : path);
	n->parent = parent;
	n->is_dir = is_dir;
	memcpy(n->value, "1\n", 2);
	p = &nodes[parent];
	if (p->nchildren == p->cap) {
		p->cap = p->cap ? 2 * p->cap : 8;
		p->children = realloc(p->children, p->cap * sizeof(*p->children));
	}
	p->children[p->nchildren++] = nnodes;
	return nnodes++;
}

static int load_manifest(FILE *in)
{
	char line[4096];

	nodes = calloc(2, sizeof(*nodes));	/* 0 unused, 1 the root */
	nodes[1].name = strdup("");
	nodes[1].is_dir = 1;
	nnodes = 2;
	while (fgets(line, sizeof(line), in)) {
		line[strcspn(line, "\n")] = '\0';
		if (strlen(line) < 3 || (line[0] != 'd' && line[0] != 'f') || line[1] != ' ' ||
		    !add_node(line + 2, line[0] == 'd')) {
			fprintf(stderr, "bench-peer: bad manifest line: %s\n", line);
			return -1;
		}
	}
	for (size_t i = 1; i < nnodes; i++)
		qsort(nodes[i].children, nodes[i].nchildren, sizeof(fuse_ino_t), sort_children);
	return 0;
}

int main(int argc, char **argv)
{
	struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
	struct fuse_session *se;
	int ret = 1;

	if (argc < 3) {
		fprintf(stderr, "usage: bench-peer MOUNTPOINT TIMEOUT [-o OPTIONS] < manifest\n");
		return 2;
	}
	timeout = atof(argv[2]);
	if (load_manifest(stdin))
		return 1;
	fuse_opt_add_arg(&args, argv[0]);
	for (int i = 3; i < argc; i++)
		fuse_opt_add_arg(&args, argv[i]);
	se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	if (se && fuse_set_signal_handlers(se) == 0) {
		if (fuse_session_mount(se, argv[1]) == 0) {
			ret = fuse_session_loop(se);
			fuse_session_unmount(se);
		}
		fuse_remove_signal_handlers(se);
	}
	if (se)
		fuse_session_destroy(se);
	fuse_opt_free_args(&args);
	return ret ? 1 : 0;
}
