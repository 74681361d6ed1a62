import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { catalogVersion, invalidateCatalog, readThrough, type CachePolicy } from "../../src/catalog/cache";

const NOW = new Date("2026-11-20T00:00:00.000Z").getTime();
const POLICY: CachePolicy = { freshSeconds: 30, ttlSeconds: 60 };

function fakeKv(stored: Record<string, string> = {}, failures: { get?: boolean; put?: boolean } = {}) {
  const metadata: Record<string, unknown> = {};
  const put = vi.fn(async (key: string, value: string, options?: KVNamespacePutOptions) => {
    if (failures.put) throw new Error("KV PUT failed: 429 Too Many Requests");
    stored[key] = value;
    metadata[key] = options?.metadata ?? null;
  });
  const get = vi.fn(async (key: string) => {
    if (failures.get) throw new Error("KV GET failed");
    return { value: stored[key] ?? null, metadata: metadata[key] ?? null };
  });
  /** An entry as readThrough writes it, computed `ageMs` ago. */
  const seed = (key: string, value: string, ageMs = 0, policy = POLICY) => {
    stored[key] = value;
    metadata[key] = { freshUntil: NOW - ageMs + policy.freshSeconds * 1000, expiresAt: NOW - ageMs + policy.ttlSeconds * 1000 };
  };
  return { kv: { getWithMetadata: get, put } as unknown as KVNamespace, get, put, stored, seed };
}

/** A request's waitUntil: `settled()` waits for everything handed to it, including work added meanwhile. */
function requestLifetime() {
  const work: Promise<unknown>[] = [];
  return {
    waitUntil: (promise: Promise<unknown>) => void work.push(promise),
    async settled() {
      while (work.length > 0) await work.shift();
    },
  };
}

/** A compute that counts its calls and answers only when released, so concurrent readers overlap it. */
function gatedCompute<T>(result: () => T) {
  let release!: () => void;
  let gate = new Promise<void>((r) => (release = r));
  const compute = vi.fn(async () => {
    await gate;
    return result();
  });
  return {
    compute,
    release() {
      release();
      gate = new Promise<void>((r) => (release = r));
    },
  };
}

const settle = (ms = 10) => new Promise((r) => setTimeout(r, ms));

beforeEach(() => {
  vi.useFakeTimers({ now: NOW, toFake: ["Date"] });
});
afterEach(() => {
  vi.useRealTimers();
});

describe("readThrough", () => {
  it("serves a hit within its TTL as stored, without computing or writing", async () => {
    const { kv, put, seed } = fakeKv();
    seed("k", '{"cached":true}', 10_000);
    const compute = vi.fn(async () => ({ cached: false }));
    expect(await readThrough(kv, "k", POLICY, compute, requestLifetime().waitUntil)).toBe('{"cached":true}');
    expect(compute).not.toHaveBeenCalled();
    expect(put).not.toHaveBeenCalled();
  });

  it("computes a miss and stores it once, with the TTL and its soft and hard expiry from the compute's start", async () => {
    const { kv, put } = fakeKv();
    const request = requestLifetime();
    expect(await readThrough(kv, "k", { freshSeconds: 900, ttlSeconds: 1800 }, async () => ({ a: 1 }), request.waitUntil)).toBe('{"a":1}');
    await request.settled();
    expect(put).toHaveBeenCalledExactlyOnceWith("k", '{"a":1}', {
      expirationTtl: 1800,
      metadata: { freshUntil: NOW + 900_000, expiresAt: NOW + 1_800_000 },
    });
  });

  it("does not serve an entry whose metadata gives no expiry (its age cannot be bounded)", async () => {
    const { kv } = fakeKv({ k: '"unbounded"' });
    expect(await readThrough(kv, "k", POLICY, async () => "fresh", requestLifetime().waitUntil)).toBe('"fresh"');
  });

  it("serves from the source, without writing, when KV cannot be read", async () => {
    const { kv, put } = fakeKv({}, { get: true });
    const request = requestLifetime();
    expect(await readThrough(kv, "k", POLICY, async () => [1], request.waitUntil)).toBe("[1]");
    await request.settled();
    expect(put).not.toHaveBeenCalled();
  });

  it("still answers when the KV write is refused", async () => {
    const { kv } = fakeKv({}, { put: true });
    const request = requestLifetime();
    expect(await readThrough(kv, "k", POLICY, async () => "x", request.waitUntil)).toBe('"x"');
    await request.settled();
  });

  it("lets a failure of the source propagate", async () => {
    const { kv } = fakeKv();
    const failing = async () => Promise.reject(new Error("D1 down"));
    await expect(readThrough(kv, "k", POLICY, failing, requestLifetime().waitUntil)).rejects.toThrow("D1 down");
  });
});

describe("a stampede on one key (single flight)", () => {
  it("50 concurrent reads of a cold key make one KV read, one compute and one write, and all get its body", async () => {
    const { kv, get, put } = fakeKv();
    const { compute, release } = gatedCompute(() => ({ ranking: [1, 2, 3] }));
    const requests = Array.from({ length: 50 }, requestLifetime);
    const reads = requests.map((r) => readThrough(kv, "popular:2026-11-20", POLICY, compute, r.waitUntil));
    await settle();
    release();
    expect(new Set(await Promise.all(reads))).toEqual(new Set(['{"ranking":[1,2,3]}']));
    await Promise.all(requests.map((r) => r.settled()));
    expect(compute).toHaveBeenCalledTimes(1);
    expect(get).toHaveBeenCalledTimes(1);
    expect(put).toHaveBeenCalledTimes(1);
  });

  it("a failed compute reaches every request that waited on it, is not kept, and the next request tries again", async () => {
    const { kv, put } = fakeKv();
    let fail = true;
    const { compute, release } = gatedCompute(() => {
      if (fail) throw new Error("D1 down");
      return "recovered";
    });
    const reads = Array.from({ length: 50 }, () =>
      readThrough(kv, "k", POLICY, compute, requestLifetime().waitUntil).then(
        () => "answered",
        (error: Error) => error.message,
      ),
    );
    await settle();
    release();
    expect(new Set(await Promise.all(reads))).toEqual(new Set(["D1 down"]));
    expect(compute).toHaveBeenCalledTimes(1);
    expect(put).not.toHaveBeenCalled();

    fail = false;
    const retry = readThrough(kv, "k", POLICY, compute, requestLifetime().waitUntil);
    await settle();
    release();
    expect(await retry).toBe('"recovered"');
    expect(compute).toHaveBeenCalledTimes(2);
  });

  it("past the soft expiry, serves the stale entry at once while one request refreshes it in the background", async () => {
    const { kv, put, stored, seed } = fakeKv();
    seed("k", '"old"', 45_000);
    const { compute, release } = gatedCompute(() => "new");
    const requests = Array.from({ length: 50 }, requestLifetime);
    const reads = await Promise.all(requests.map((r) => readThrough(kv, "k", POLICY, compute, r.waitUntil)));
    expect(new Set(reads)).toEqual(new Set(['"old"']));
    expect(compute).toHaveBeenCalledTimes(1);

    release();
    await Promise.all(requests.map((r) => r.settled()));
    expect(put).toHaveBeenCalledExactlyOnceWith("k", '"new"', {
      expirationTtl: 60,
      metadata: { freshUntil: NOW + 30_000, expiresAt: NOW + 60_000 },
    });
    expect(stored.k).toBe('"new"');
    expect(await readThrough(kv, "k", POLICY, compute, requestLifetime().waitUntil)).toBe('"new"');
    expect(compute).toHaveBeenCalledTimes(1);
  });

  it("a failed background refresh keeps serving the stale entry, and a later request refreshes again", async () => {
    const { kv, seed } = fakeKv();
    seed("k", '"old"', 45_000);
    const compute = vi.fn().mockRejectedValueOnce(new Error("D1 down")).mockResolvedValueOnce("new");
    const first = requestLifetime();
    expect(await readThrough(kv, "k", POLICY, compute, first.waitUntil)).toBe('"old"');
    await first.settled();
    const second = requestLifetime();
    expect(await readThrough(kv, "k", POLICY, compute, second.waitUntil)).toBe('"old"');
    await second.settled();
    expect(compute).toHaveBeenCalledTimes(2);
    expect(await readThrough(kv, "k", POLICY, compute, requestLifetime().waitUntil)).toBe('"new"');
  });

  it("never serves an entry at or past its hard expiry, even if KV still returns it: readers wait for the compute", async () => {
    const { kv, seed } = fakeKv();
    seed("k", '"too old"', 60_000);
    const { compute, release } = gatedCompute(() => "fresh");
    const reads = Array.from({ length: 10 }, () => readThrough(kv, "k", POLICY, compute, requestLifetime().waitUntil));
    await settle();
    release();
    expect(new Set(await Promise.all(reads))).toEqual(new Set(['"fresh"']));
    expect(compute).toHaveBeenCalledTimes(1);
  });
});

describe("invalidateCatalog", () => {
  it("writes a new version each time", async () => {
    const { kv, stored } = fakeKv();
    await invalidateCatalog(kv);
    const first = stored["catalog:version"];
    await invalidateCatalog(kv);
    expect(first).toBeDefined();
    expect(stored["catalog:version"]).not.toBe(first);
  });

  it("never fails the admin write it follows", async () => {
    const { kv } = fakeKv({}, { put: true });
    await expect(invalidateCatalog(kv)).resolves.toBeUndefined();
  });
});

describe("the one-second memo in front of KV", () => {
  it("reads KV once per key per second, then again", async () => {
    const { kv, get, seed } = fakeKv();
    seed("k", '"v1"');
    const compute = async () => "unused";
    const read = () => readThrough(kv, "k", POLICY, compute, requestLifetime().waitUntil);
    expect(await read()).toBe('"v1"');
    expect(await read()).toBe('"v1"');
    expect(get).toHaveBeenCalledTimes(1);
    vi.advanceTimersByTime(1_001);
    expect(await read()).toBe('"v1"');
    expect(get).toHaveBeenCalledTimes(2);
  });

  it("an invalidation is visible at once in the isolate that made it", async () => {
    const { kv } = fakeKv({ "catalog:version": "old" });
    expect(await catalogVersion(kv)).toBe("old");
    await invalidateCatalog(kv);
    const fresh = await catalogVersion(kv);
    expect(fresh).not.toBe("old");
    expect(fresh).toMatch(/^[0-9a-f-]{36}$/);
  });
});

describe("the memo never outlives the KV entry", () => {
  it("an entry read just before it expires is not served past its expiry", async () => {
    const { kv, stored, seed } = fakeKv();
    seed("k", '"old"', 59_800);
    const request = requestLifetime();
    const failing = async () => Promise.reject(new Error("D1 down"));
    expect(await readThrough(kv, "k", POLICY, failing, request.waitUntil)).toBe('"old"');
    await request.settled();
    vi.advanceTimersByTime(300);
    delete stored.k;
    expect(await readThrough(kv, "k", POLICY, async () => "fresh", requestLifetime().waitUntil)).toBe('"fresh"');
  });

  it("a version read in flight does not overwrite an invalidation made meanwhile", async () => {
    const { kv, get } = fakeKv({ "catalog:version": "old" });
    let release!: () => void;
    get.mockImplementationOnce(async () => {
      await new Promise<void>((r) => (release = r));
      return { value: "old", metadata: null };
    });
    const slowRead = catalogVersion(kv);
    await invalidateCatalog(kv);
    const invalidated = await catalogVersion(kv);
    release();
    expect(await slowRead).toBe(invalidated);
    expect(await catalogVersion(kv)).toBe(invalidated);
  });
});
