import { describe, expect, it } from "vitest";
import { requestFingerprint } from "../../src/lib/idempotency";

describe("requestFingerprint", () => {
  it("is the SHA-256 hex of method, path and raw body", async () => {
    expect(await requestFingerprint("POST", "/api/balance/charge", '{"amount":1}')).toBe(
      "6feb95fa9a80f54fbd492a0c7f2272a50e3f9bacfc8f7adca0718b445dd99434",
    );
    expect(await requestFingerprint("post", "/p", "")).toBe(
      "35796be418e451ff685f4f431febe231c52d111a1f465bd36c559c561c1fa1ed",
    );
  });

  it("differs when the method, the path or any byte of the body differs", async () => {
    const base = await requestFingerprint("POST", "/a", '{"amount":1}');
    const variants = await Promise.all([
      requestFingerprint("PUT", "/a", '{"amount":1}'),
      requestFingerprint("POST", "/b", '{"amount":1}'),
      requestFingerprint("POST", "/a", '{"amount":2}'),
      requestFingerprint("POST", "/a", '{"amount": 1}'),
    ]);
    for (const v of variants) expect(v).not.toBe(base);
  });
});
