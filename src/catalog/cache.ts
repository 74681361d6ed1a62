import { describeError, log } from "../lib/log";

// KV holds whole response bodies (JSON text), so a hit is served without parsing or re-serialising.
// A KV failure never fails a read: the body is then computed from D1 and simply not cached.
//
// In front of KV, each isolate remembers what it read for one second: a hot list is then served without
// the two KV round trips (version, page). The staleness this adds is at most that second, and only in
// isolates other than the one that made an admin write (which updates its memory at once); KV itself
// already takes up to 60 s to show a write in other locations.

const MEMO_MS = 1_000;
const MEMO_MAX_KEYS = 256;
interface MemoEntry {
  value: string | null;
  until: number;
  /** When it was remembered, in this isolate's order of events. */
  seq: number;
}

const memos = new WeakMap<KVNamespace, Map<string, MemoEntry>>();
let seq = 0;

function memoOf(kv: KVNamespace) {
  let memo = memos.get(kv);
  if (!memo) memos.set(kv, (memo = new Map()));
  return memo;
}

/** KV entries carry their own expiry, so the memo never keeps one past it (the contract's 60 s). */
interface EntryMeta {
  expiresAt?: number;
}

async function memoGet(kv: KVNamespace, key: string): Promise<string | null> {
  const hit = memoOf(kv).get(key);
  if (hit && hit.until > Date.now()) return hit.value;
  const startedAt = ++seq;
  const { value, metadata } = await kv.getWithMetadata<EntryMeta>(key);
  // A newer value remembered while this read was in flight (an invalidation) wins over what it read.
  const current = memoOf(kv).get(key);
  if (!current || current.seq < startedAt) remember(kv, key, value, metadata?.expiresAt);
  return value;
}

function remember(kv: KVNamespace, key: string, value: string | null, expiresAt = Infinity): void {
  const memo = memoOf(kv);
  if (memo.size >= MEMO_MAX_KEYS) memo.clear();
  memo.set(key, { value, until: Math.min(Date.now() + MEMO_MS, expiresAt), seq: ++seq });
}

const CATALOG_VERSION_KEY = "catalog:version";

/** The body under `key`, or `compute()` serialised and stored for `ttlSeconds` (written on a miss only). */
export async function readThrough(
  kv: KVNamespace,
  key: string,
  ttlSeconds: number,
  compute: () => Promise<unknown>,
): Promise<string> {
  const cached = await memoGet(kv, key).catch((error: unknown) => {
    log("warn", "cache: KV read failed; serving uncached", { key, ...describeError(error) });
    return undefined;
  });
  if (typeof cached === "string") return cached;
  const body = JSON.stringify(await compute());
  if (cached === null) {
    // KV allows about one write per second per key: concurrent misses may collide, and losing one is harmless.
    const expiresAt = Date.now() + ttlSeconds * 1000;
    await kv.put(key, body, { expirationTtl: ttlSeconds, metadata: { expiresAt } satisfies EntryMeta }).catch((error: unknown) => {
      log("warn", "cache: KV write failed", { key, ...describeError(error) });
    });
    remember(kv, key, body, expiresAt);
  }
  return body;
}

/** The catalog's current version; it is part of every product-list cache key. */
export async function catalogVersion(kv: KVNamespace): Promise<string | null> {
  try {
    return (await memoGet(kv, CATALOG_VERSION_KEY)) ?? "0";
  } catch (error) {
    log("warn", "cache: catalog version unreadable; list served uncached", describeError(error));
    return null;
  }
}

/**
 * Moves the catalog to a new version, so the next list read in this location misses and goes to D1;
 * entries of older versions are never read again and expire on their own. Best effort: the product is
 * already written, and a list at most 60 s stale is within the contract.
 */
export async function invalidateCatalog(kv: KVNamespace): Promise<void> {
  const version = crypto.randomUUID();
  remember(kv, CATALOG_VERSION_KEY, version);
  try {
    await kv.put(CATALOG_VERSION_KEY, version);
  } catch (error) {
    log("warn", "cache: catalog version bump failed; lists may stay stale up to their TTL", describeError(error));
  }
}
