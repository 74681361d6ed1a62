import { describeError, log } from "../lib/log";

// KV holds whole response bodies (JSON text), so a hit is served without parsing or re-serialising.
// A KV failure never fails a read: the body is then computed from D1 and simply not cached.

const CATALOG_VERSION_KEY = "catalog:version";

/** The body under `key`, or `compute()` serialised and stored for `ttlSeconds` (written on a miss only). */
export async function readThrough(
  kv: KVNamespace,
  key: string,
  ttlSeconds: number,
  compute: () => Promise<unknown>,
): Promise<string> {
  const cached = await kv.get(key).catch((error: unknown) => {
    log("warn", "cache: KV read failed; serving uncached", { key, ...describeError(error) });
    return undefined;
  });
  if (typeof cached === "string") return cached;
  const body = JSON.stringify(await compute());
  if (cached === null) {
    // KV allows about one write per second per key: concurrent misses may collide, and losing one is harmless.
    await kv.put(key, body, { expirationTtl: ttlSeconds }).catch((error: unknown) => {
      log("warn", "cache: KV write failed", { key, ...describeError(error) });
    });
  }
  return body;
}

/** The catalog's current version; it is part of every product-list cache key. */
export async function catalogVersion(kv: KVNamespace): Promise<string | null> {
  try {
    return (await kv.get(CATALOG_VERSION_KEY)) ?? "0";
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
  try {
    await kv.put(CATALOG_VERSION_KEY, crypto.randomUUID());
  } catch (error) {
    log("warn", "cache: catalog version bump failed; lists may stay stale up to their TTL", describeError(error));
  }
}
