import { describeError, log } from "../lib/log";

// KV holds whole response bodies (JSON text), so a hit is served without parsing or re-serialising.
// A KV failure never fails a read: the body is then computed from D1 and simply not stored.
//
// Staleness. Each entry carries in its KV metadata two instants counted from when its compute started
// (before D1 was read, so the body is at least that fresh): `freshUntil` and `expiresAt` = start + TTL.
// Nothing is served at or past `expiresAt`: every read checks it, in the memo and on what KV returns, so
// no body is ever older than the TTL (the contract's 60 s for the list, 30 min for the ranking) however
// late KV's propagation or an edge copy is (the instant travels with the value). Between `freshUntil` and
// `expiresAt` the entry is still served, and one request per isolate recomputes it in the background.
//
// Stampedes. Concurrent misses of one key in one isolate share one KV read and one compute (one D1
// query); a failed compute is given to the requests that waited on it and forgotten, so the next request
// tries again. In front of KV, each isolate remembers what it read for one second: a hot list is then
// served without the two KV round trips (version, page). That second is only visible in isolates other
// than the one that made an admin write (which updates its memory at once), and never outlasts `expiresAt`.

const MEMO_MS = 1_000;
const MEMO_MAX_KEYS = 256;

export interface CachePolicy {
  /** How long an entry is served without a refresh. */
  freshSeconds: number;
  /** How long it may be served at all: the contract's staleness bound (KV takes at least 60). */
  ttlSeconds: number;
}

/** Hands work to the request's `ctx.waitUntil`, so it completes after the response is sent. */
export type WaitUntil = (work: Promise<unknown>) => void;

interface EntryMeta {
  freshUntil?: number;
  expiresAt?: number;
}

interface Stored {
  value: string | null;
  meta: EntryMeta | null;
}

interface MemoEntry extends Stored {
  until: number;
  /** When it was remembered, in this isolate's order of events. */
  seq: number;
}

interface IsolateCache {
  memo: Map<string, MemoEntry>;
  /** Reads of a key missing from the memo: KV, then a compute if KV has nothing servable. */
  loads: Map<string, Promise<string>>;
  /** Computes of a key (a miss, or a refresh of a stale entry). */
  computes: Map<string, Promise<string>>;
}

const isolates = new WeakMap<KVNamespace, IsolateCache>();
let seq = 0;

function isolateCache(kv: KVNamespace): IsolateCache {
  let cache = isolates.get(kv);
  if (!cache) isolates.set(kv, (cache = { memo: new Map(), loads: new Map(), computes: new Map() }));
  return cache;
}

function fromMemo(kv: KVNamespace, key: string): Stored | undefined {
  const hit = isolateCache(kv).memo.get(key);
  return hit && hit.until > Date.now() ? hit : undefined;
}

/** KV's value for `key`, unless this isolate remembered a newer one (an invalidation) while it was read. */
async function readKv(kv: KVNamespace, key: string): Promise<Stored> {
  const startedAt = ++seq;
  const { value, metadata } = await kv.getWithMetadata<EntryMeta>(key);
  const current = isolateCache(kv).memo.get(key);
  if (current && current.seq > startedAt) return current;
  const read = { value, meta: metadata };
  remember(kv, key, read);
  return read;
}

function remember(kv: KVNamespace, key: string, stored: Stored): void {
  const { memo } = isolateCache(kv);
  if (memo.size >= MEMO_MAX_KEYS) memo.clear();
  memo.set(key, { ...stored, until: Math.min(Date.now() + MEMO_MS, stored.meta?.expiresAt ?? Infinity), seq: ++seq });
}

/**
 * One run of `start` per key at a time in this isolate: whoever comes while it runs shares its outcome,
 * success or failure, and a settled run is forgotten. The run is handed to its starter's waitUntil because
 * workerd cancels the continuations of a promise whose creating request has ended: the starter must live
 * until the run settles, even if its own client has gone, or the requests sharing it would never answer.
 */
function once(flights: Map<string, Promise<string>>, key: string, waitUntil: WaitUntil, start: () => Promise<string>) {
  let flight = flights.get(key);
  if (!flight) {
    flight = start().finally(() => flights.delete(key));
    flights.set(key, flight);
    // Its failure belongs to the requests awaiting it; the request's lifetime only needs it settled.
    waitUntil(flight.catch(() => undefined));
  }
  return flight;
}

/** The body under `key`: served from the memo or KV while within its TTL, else computed once and stored. */
export async function readThrough(
  kv: KVNamespace,
  key: string,
  policy: CachePolicy,
  compute: () => Promise<unknown>,
  waitUntil: WaitUntil,
): Promise<string> {
  const serve = (stored: Stored | undefined): string | undefined => {
    const { value, meta } = stored ?? {};
    const now = Date.now();
    if (typeof value !== "string" || !meta?.expiresAt || now >= meta.expiresAt) return undefined;
    if (now >= (meta.freshUntil ?? 0) && !isolateCache(kv).computes.has(key)) {
      recompute(kv, key, policy, compute, waitUntil, true).catch((error: unknown) => {
        log("warn", "cache: background refresh failed; the stale entry is served until it expires", {
          key,
          ...describeError(error),
        });
      });
    }
    return value;
  };
  return (
    serve(fromMemo(kv, key)) ??
    once(isolateCache(kv).loads, key, waitUntil, async () => {
      const stored = await readKv(kv, key).catch((error: unknown) => {
        log("warn", "cache: KV read failed; serving uncached", { key, ...describeError(error) });
        return undefined;
      });
      return serve(stored) ?? recompute(kv, key, policy, compute, waitUntil, stored !== undefined);
    })
  );
}

function recompute(
  kv: KVNamespace,
  key: string,
  policy: CachePolicy,
  compute: () => Promise<unknown>,
  waitUntil: WaitUntil,
  store: boolean,
): Promise<string> {
  return once(isolateCache(kv).computes, key, waitUntil, async () => {
    const startedAt = Date.now();
    const body = JSON.stringify(await compute());
    const meta = {
      freshUntil: startedAt + policy.freshSeconds * 1000,
      expiresAt: startedAt + policy.ttlSeconds * 1000,
    } satisfies EntryMeta;
    if (store) {
      remember(kv, key, { value: body, meta });
      // KV allows about one write per second per key; a lost write only costs another compute later.
      waitUntil(
        kv.put(key, body, { expirationTtl: policy.ttlSeconds, metadata: meta }).catch((error: unknown) => {
          log("warn", "cache: KV write failed", { key, ...describeError(error) });
        }),
      );
    }
    return body;
  });
}

const CATALOG_VERSION_KEY = "catalog:version";

/** The catalog's current version; it is part of every product-list cache key. */
export async function catalogVersion(kv: KVNamespace): Promise<string | null> {
  try {
    return ((fromMemo(kv, CATALOG_VERSION_KEY) ?? (await readKv(kv, CATALOG_VERSION_KEY))).value ?? "0");
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
  remember(kv, CATALOG_VERSION_KEY, { value: version, meta: null });
  try {
    await kv.put(CATALOG_VERSION_KEY, version);
  } catch (error) {
    log("warn", "cache: catalog version bump failed; lists may stay stale up to their TTL", describeError(error));
  }
}
