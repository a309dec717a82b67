"""byteback simulate: years of synthetic backups on a disc of fixed size, pruned by byteback's own code.

An administrator runs it to see what `prune` will keep before trusting a disc
to it.  Every prune step calls byteback's retention functions -- the
deletion order, the free-space target, the suspicious-backup test -- never a
copy, so what the simulator shows is what `prune` does.

Modules:   model     parameters, hosts and the synthetic workload (one seeded RNG)
           policies  named target lists (presets) and the original code's schedule
           engine    the virtual clock, the copy-on-write disc, prune after each snapshot
           metrics   oldest kept, worst relative gap per age band, last week kept
           report    terminal table, terminal chart, JSON
           svg       the same chart as a hand-written SVG picture
           cli       `byteback simulate` argument parsing

The model (what it assumes; README.md repeats it):

* Time advances in backup intervals.  Every host backs up once per interval,
  a few minutes after the previous host; each successful backup becomes one
  snapshot, and `prune` runs after every snapshot, as on the server.
* A host's data is a *cold* part, written once and never changed, and a *hot*
  part (logs, databases, mail) that the changes rewrite.  A backup writes its
  change: rewrites of hot data, chosen uniformly at random among the hot data,
  plus the data growth.  The hot part is `--hot` mean changes big; the data
  and the mean change grow by `--growth` a year; each change has log-normal
  noise (`--noise`).
* Copy-on-write accounting: a byte written by backup i stays in every later
  snapshot until a later backup rewrites it.  The disc holds each byte once,
  while any kept snapshot (or the live copy, `current`) still holds it.
  Deleting a snapshot frees what was written after the previous kept
  snapshot and rewritten before the next kept one.  The first backup of a
  host is its full size; the newest snapshot always equals `current`.
* Occasional huge backups (`--huge`): a lump of new data `--huge-factor`
  times the mean change, deleted from the host again a few backups later.
  Occasional failed backups (`--fail`): nothing is written and no snapshot
  is taken; the next backup carries the change (rewrites of the same hot
  data overlap, growth adds up).
* A backup that does not fit in the free space fails for lack of space and
  writes nothing (real rsync would leave the part that fitted in `current`,
  for the next attempt to resume).
* The server side is byteback's: after a snapshot the backup's size is
  recorded with `is_suspicious`; prune keeps `free_space_target` free,
  refuses while any host's newest backup is suspicious and not accepted
  (nobody runs `prune --force` in the simulation), and deletes one snapshot
  at a time in `deletion_order`, re-measuring the free space after each.
* Not modelled: compression, metadata, btrfs's lag in freeing space (prune
  waits for the cleaner), clock changes, disc size changes.
"""
