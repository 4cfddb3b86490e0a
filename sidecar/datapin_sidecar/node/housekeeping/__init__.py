"""Node housekeeping for the node agent: cache GC, abandoned download slots, dead workspaces.

The node agent (one per node) owns a volume rooted at `R`::

    R/cache/                                  the NodeCache (see `engine.cache`)
    R/cache/.datapin/used/<layout>-<md5>.dir  empty; mtime = last materialise/prefetch (LRU clock)
    R/cache/.datapin/used/<layout>-<md5>.dir-p<16 hex>   the same for a part of the revision;
                                              holds the part's folders (JSON list)
    R/cache/.datapin/gc.lock                  flock: one GC at a time
    R/cache/.datapin/builds/, builds.lock     builds in progress (`NodeCache.building`)
    R/workspaces/<pod-uid>/.pod.json          written by the pod's sidecar (may be absent)
    R/workspaces/<pod-uid>/<dataset>/         DEST, mounted by the pod (maybe writable): `current`
                                              and the trees under `.revs/`; pod-controlled
    R/workspaces/<pod-uid>/.state/<dataset>/  datapin's records of DEST, in no pod's view:
                                              `.datapin`, `.lock`, `.meta/<key>.json` (TreeInfo)

Older sidecars kept the same records in `DEST/.revs/` (`.datapin`, `.lock`, `.meta/`); they
are still honoured for a dataset that has no `.state/` records.

The agent is the only process that deletes cache objects. Everything here is synchronous
(filesystem-bound; the agent runs it in worker threads) and keeps no global state.

**The volume is hostile.** Pods control everything under `workspaces/` (names, file types,
sizes, symlinks, even the legacy records), and a subverted writer may have planted things in
the cache. So every path there is opened with `safefs`: directories one component at a time
without following symlinks, files only if they are regular (no FIFO, device or symlink is ever
opened, so nothing blocks) and meta files bounded (`workspace.META_LIMIT`, `roots.MAX_META_FILES`);
unlinks are relative to a directory descriptor, so a shard swapped for a symlink cannot
redirect them. What is not ours in the cache's own areas (a directory where a download slot or
temp file belongs, a symlinked shard) is removed without being followed. An item that cannot be
handled is reported to the caller's `on_error(task, path, error)` (`tasks.OnError`; the agent
counts and logs it once) and skipped; the rest of the work goes on.

One module per job:

* `tasks`: the task names item errors are reported under, and what every task shares.
* `clock`: the LRU clock (`touch_used`, the used-files), per revision and per part.
* `volume`: watermarks and statvfs readings of the volume.
* `roots`: the revisions in use, or the parts of them in use (issue 18: a part protects only
  its own objects and the `.dir`), read from the workspaces' meta files.
* `inventory`: the cache's objects, what the roots protect, and the eviction order.
* `evict`: the GC itself (`collect`), batch by batch against builds in progress.
* `slots`: abandoned download slots (`clean_slots`).
* `reaper`: workspaces of pods that are gone (`reap_workspaces`).
"""
