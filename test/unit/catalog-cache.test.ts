import { describe, expect, it, vi } from "vitest";
import { catalogVersion, invalidateCatalog, readThrough } from "../../src/catalog/cache";

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
  return { kv: { getWithMetadata: get, put } as unknown as KVNamespace, get, put, stored };
}

describe("readThrough", () => {
  it("serves a hit as stored, without computing", async () => {
    const { kv, put } = fakeKv({ k: '{"cached":true}' });
    const compute = vi.fn(async () => ({ cached: false }));
    expect(await readThrough(kv, "k", 60, compute)).toBe('{"cached":true}');
    expect(compute).not.toHaveBeenCalled();
    expect(put).not.toHaveBeenCalled();
  });

  it("computes a miss and stores it once, with the TTL", async () => {
    const { kv, put } = fakeKv();
    expect(await readThrough(kv, "k", 1800, async () => ({ a: 1 }))).toBe('{"a":1}');
    expect(put).toHaveBeenCalledExactlyOnceWith("k", '{"a":1}', { expirationTtl: 1800, metadata: { expiresAt: expect.any(Number) } });
  });

  it("serves from the source, without writing, when KV cannot be read", async () => {
    const { kv, put } = fakeKv({}, { get: true });
    expect(await readThrough(kv, "k", 60, async () => [1])).toBe("[1]");
    expect(put).not.toHaveBeenCalled();
  });

  it("still answers when the KV write is refused", async () => {
    const { kv } = fakeKv({}, { put: true });
    expect(await readThrough(kv, "k", 60, async () => "x")).toBe('"x"');
  });

  it("lets a failure of the source propagate", async () => {
    const { kv } = fakeKv();
    await expect(readThrough(kv, "k", 60, async () => Promise.reject(new Error("D1 down")))).rejects.toThrow("D1 down");
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
    vi.useFakeTimers({ now: new Date("2026-11-20T00:00:00.000Z"), toFake: ["Date"] });
    try {
      const { kv, get } = fakeKv({ k: '"v1"' });
      const compute = async () => "unused";
      expect(await readThrough(kv, "k", 60, compute)).toBe('"v1"');
      expect(await readThrough(kv, "k", 60, compute)).toBe('"v1"');
      expect(get).toHaveBeenCalledTimes(1);
      vi.advanceTimersByTime(1_001);
      expect(await readThrough(kv, "k", 60, compute)).toBe('"v1"');
      expect(get).toHaveBeenCalledTimes(2);
    } finally {
      vi.useRealTimers();
    }
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
    vi.useFakeTimers({ now: new Date("2026-11-20T00:00:00.000Z"), toFake: ["Date"] });
    try {
      const { kv, get, stored } = fakeKv();
      const expiresAt = Date.now() + 200;
      stored.k = '"old"';
      get.mockImplementation(async (key: string) => ({ value: stored[key] ?? null, metadata: key === "k" ? { expiresAt } : null }));
      expect(await readThrough(kv, "k", 60, async () => "fresh")).toBe('"old"');
      vi.advanceTimersByTime(300);
      delete stored.k;
      expect(await readThrough(kv, "k", 60, async () => "fresh")).toBe('"fresh"');
    } finally {
      vi.useRealTimers();
    }
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
    release();
    expect(await slowRead).toBe("old");
    expect(await catalogVersion(kv)).not.toBe("old");
  });
});
