/* Keeps secrets off a program's command line: an LD_PRELOAD library that, before the program's main() runs,
 * replaces each placeholder "@mstriton-secret:NAME@" inside its arguments with the value of the environment
 * variable NAME, and removes NAME (and itself) from the environment its children inherit.
 *
 * Why: tritonserver 2.51 takes its restricted-API keys only as command-line options, and /proc/PID/cmdline (what
 * `ps` shows) is readable by every local user. The kernel shows the argument strings as they were at exec; the
 * program reads its arguments through the argv array. So the strings stay as the placeholders and only the
 * array's pointers are changed, to copies holding the secrets. /proc/PID/environ, which still holds the value,
 * is readable only by the process's own user and root.
 *
 * It acts only in the program named by $MSTRITON_SECRET_ARGS_PROGRAM (compared with the basename of
 * /proc/self/exe): a shell wrapper in between keeps its placeholders, and passes them on unchanged.
 * Plain C, no CPU features needed. Build: make -C mstriton/argv_secrets (tools/install.sh does).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define OPEN "@mstriton-secret:"
#define PROGRAM_VARIABLE "MSTRITON_SECRET_ARGS_PROGRAM"

static int is_target_program(void) {
  const char *wanted = getenv(PROGRAM_VARIABLE);
  char exe[4096];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (!wanted || n <= 0) return 0;
  exe[n] = '\0';
  const char *base = strrchr(exe, '/');
  return strcmp(base ? base + 1 : exe, wanted) == 0;
}

/* `arg` with every placeholder replaced (a new string), or NULL when it has none. Exits when a placeholder names
 * a variable that is not set: running with the placeholder itself as a key would lock everyone out silently. */
static char *filled(const char *arg, char **names, int *n_names, int max_names) {
  if (!strstr(arg, OPEN)) return NULL;
  size_t cap = strlen(arg) + 1, len = 0;
  char *out = malloc(cap);
  const char *p = arg;
  while (out) {
    const char *open = strstr(p, OPEN);
    const char *name = open ? open + strlen(OPEN) : NULL;
    const char *close = name ? strchr(name, '@') : NULL;
    size_t keep = close ? (size_t)(open - p) : strlen(p);
    const char *value = NULL;
    if (close) {
      char variable[256];
      size_t vlen = (size_t)(close - name);
      if (vlen == 0 || vlen >= sizeof variable) { fprintf(stderr, "argv_secrets: bad placeholder in %s\n", arg); _exit(2); }
      memcpy(variable, name, vlen);
      variable[vlen] = '\0';
      value = getenv(variable);
      if (!value) { fprintf(stderr, "argv_secrets: $%s is not set (a placeholder names it)\n", variable); _exit(2); }
      if (*n_names < max_names) names[(*n_names)++] = strdup(variable);
    }
    size_t need = len + keep + (value ? strlen(value) : 0) + 1;
    if (need > cap) { cap = need * 2; out = realloc(out, cap); if (!out) break; }
    memcpy(out + len, p, keep);
    len += keep;
    if (!close) { out[len] = '\0'; return out; }
    memcpy(out + len, value, strlen(value));
    len += strlen(value);
    p = close + 1;
  }
  fprintf(stderr, "argv_secrets: out of memory\n");
  _exit(2);
}

/* Our own entry out of LD_PRELOAD (space- or colon-separated), so that the program's children do not load us. */
static void leave_preload(void) {
  const char *preload = getenv("LD_PRELOAD");
  if (!preload) return;
  char *copy = strdup(preload), *kept = calloc(strlen(preload) + 1, 1), *save = NULL;
  for (char *item = strtok_r(copy, " :", &save); item; item = strtok_r(NULL, " :", &save)) {
    if (strstr(item, "argv_secrets")) continue;
    if (*kept) strcat(kept, ":");
    strcat(kept, item);
  }
  if (*kept) setenv("LD_PRELOAD", kept, 1); else unsetenv("LD_PRELOAD");
  free(copy);
  free(kept);
}

__attribute__((constructor)) static void fill_secrets(int argc, char **argv, char **envp) {
  (void)envp;
  if (!is_target_program()) return;
  char *names[64];
  int n_names = 0;
  for (int i = 0; i < argc; i++) {
    char *replacement = filled(argv[i], names, &n_names, 64);
    if (replacement) argv[i] = replacement;
  }
  for (int i = 0; i < n_names; i++) { unsetenv(names[i]); free(names[i]); }
  unsetenv(PROGRAM_VARIABLE);
  leave_preload();
}
