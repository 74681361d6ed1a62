#!/usr/bin/env node
// Replays a first-come-first-served drop against the capacity model of docs/sharded-coupons.md and prints
// the queue each shard has at the end of the opening second. Plain Node, no dependencies.
//
//   node scripts/simulate-sharded-drop.mjs [--pieces 100000] [--rate 50000] [--seconds 5] [--shards 64]
//                                          [--object-rate 1000] [--group 100] [--d1-ms 20]
//
// The model: requests arrive at `rate`/s for `seconds`, from distinct random user ids, each routed to shard
// hash(userId) % shards; each gate object answers at most `object-rate` requests/s (Cloudflare's soft limit
// for one Durable Object) and queues the rest; a shard admits from its own quota and, dry, takes what it
// needs from its richest sibling (one transfer per 10 ms tick per dry shard); each shard sends what it
// admitted to D1 in one batch per D1 round trip (`d1-ms`), at most `group` issues per batch. Once every
// piece is issued, the Worker's sold-out mark answers without an object.

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => (arg.startsWith("--") ? [...pairs, [arg.slice(2), Number(all[i + 1])]] : pairs), []),
);
const PIECES = args.pieces ?? 100_000;
const RATE = args.rate ?? 50_000;
const SHARDS = args.shards ?? 64;
const OBJECT_RATE = args["object-rate"] ?? 1_000;
const GROUP = args.group ?? 100;
const D1_MS = args["d1-ms"] ?? 20;
const SECONDS = args.seconds ?? 5;
const TICK_MS = 10;

// The routing of src/coupons/shards.ts (shardOf), repeated here so the script runs without a build step.
const shardOf = (userId, shards) => (shards <= 1 ? 0 : ((Math.imul(userId % 2 ** 31, 2654435761) >>> 0) >>> 16) % shards);
const initialQuota = (total, shards, shard) => Math.floor(total / shards) + (shard < total % shards ? 1 : 0);

function simulate(shards) {
  const s = Array.from({ length: shards }, (_, i) => ({
    quota: initialQuota(PIECES, shards, i),
    issued: 0,
    queue: 0,
    arrived: 0,
    arrivedFirstSecond: 0,
    unflushed: 0,
    served: 0,
    queueAtOneSecond: 0,
    maxQueue: 0,
    batches: 0,
  }));
  let transfers = 0;
  let soldOutAt = null;
  let refusedByMark = 0;
  let nextUser = 1 + Math.floor(Math.random() * 1e6);
  const perTickCapacity = (OBJECT_RATE * TICK_MS) / 1000;
  for (let t = 0; t < (SECONDS * 1000) / TICK_MS; t++) {
    const arrivals = (RATE * TICK_MS) / 1000;
    const whole = Math.floor(arrivals) + (Math.random() < arrivals % 1 ? 1 : 0);
    for (let k = 0; k < whole; k++) {
      // Once the whole coupon is sold out, the Worker's mark answers without an object.
      if (soldOutAt !== null) {
        refusedByMark++;
        continue;
      }
      const shard = s[shardOf(nextUser++, shards)];
      shard.arrived++;
      if (t < 1000 / TICK_MS) shard.arrivedFirstSecond++;
      shard.queue++;
    }
    for (const shard of s) {
      const serve = Math.min(shard.queue, perTickCapacity);
      let admitted = Math.min(serve, shard.quota - shard.issued);
      if (admitted < serve) {
        // Dry: one transfer from the richest sibling, of just what is still waiting.
        const giver = s.reduce((best, x) => (x.quota - x.issued > best.quota - best.issued ? x : best));
        const pieces = Math.min(serve - admitted, giver.quota - giver.issued);
        if (pieces > 0 && giver !== shard) {
          giver.quota -= pieces;
          shard.quota += pieces;
          transfers++;
          admitted += pieces;
        }
      }
      shard.issued += admitted;
      shard.unflushed += admitted;
      if ((t + 1) % Math.max(1, Math.round(D1_MS / TICK_MS)) === 0) {
        shard.batches += Math.ceil(shard.unflushed / GROUP);
        shard.unflushed = 0;
      }
      shard.queue -= serve;
      shard.served += serve;
      shard.maxQueue = Math.max(shard.maxQueue, shard.queue);
    }
    if (t === 1000 / TICK_MS - 1) for (const shard of s) shard.queueAtOneSecond = shard.queue;
    if (soldOutAt === null && s.every((x) => x.issued === x.quota) && s.reduce((n, x) => n + x.issued, 0) === PIECES) {
      soldOutAt = ((t + 1) * TICK_MS) / 1000;
    }
  }
  const issued = s.reduce((n, x) => n + x.issued, 0);
  const batches = s.reduce((n, x) => n + x.batches, 0);
  const maxQueue = Math.max(...s.map((x) => x.queueAtOneSecond));
  return { shards, s, issued, batches, transfers, soldOutAt, refusedByMark, maxQueue, maxWaitS: maxQueue / OBJECT_RATE };
}

const fmt = (n) => Math.round(n).toLocaleString("en-US");
console.log(
  `A drop of ${fmt(PIECES)} pieces, ${fmt(RATE)} requests/s for ${SECONDS} s, one object answering ` +
    `${fmt(OBJECT_RATE)} requests/s, one D1 batch per shard every ${D1_MS} ms (at most ${GROUP} issues).\n`,
);
console.log("shards | capacity req/s | queue at 1 s (worst shard) | worst wait | D1 batches | transfers | issued | sold out at");
for (const shards of [1, 8, 16, 32, 64].filter((n) => n !== SHARDS).concat(SHARDS).sort((a, b) => a - b)) {
  const r = simulate(shards);
  console.log(
    `${String(shards).padStart(6)} | ${fmt(shards * OBJECT_RATE).padStart(14)} | ${fmt(r.maxQueue).padStart(26)} | ` +
      `${r.maxWaitS.toFixed(1).padStart(8)} s | ${fmt(r.batches).padStart(10)} | ${fmt(r.transfers).padStart(9)} | ` +
      `${fmt(r.issued).padStart(7)} | ${r.soldOutAt === null ? "not yet" : `${r.soldOutAt.toFixed(2)} s`}`,
  );
}

const run = simulate(SHARDS);
console.log(`\nOpening second, ${SHARDS} shards: requests arrived / still queued at 1 s, per shard:`);
const rows = run.s.map((x, i) => `${String(i).padStart(2)}: ${fmt(x.arrivedFirstSecond)} / ${fmt(x.queueAtOneSecond)}`);
for (let i = 0; i < rows.length; i += 4) console.log("  " + rows.slice(i, i + 4).map((r) => r.padEnd(24)).join(""));
console.log(
  `\n${fmt(run.issued)} issued in ${fmt(run.batches)} D1 batches (≈ issued / ${GROUP}), ${fmt(run.transfers)} quota transfers, ` +
    `${fmt(run.refusedByMark)} refusals answered by the Worker's sold-out mark` +
    (run.soldOutAt === null ? "; not sold out yet." : `; sold out at ${run.soldOutAt.toFixed(2)} s.`),
);
