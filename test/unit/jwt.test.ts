import { sign } from "hono/jwt";
import { describe, expect, it } from "vitest";
import { verifyHs256 } from "../../src/lib/auth";

// The HS256 verifier every authenticated request runs: what it accepts and, above all, what it refuses.

const SECRET = "unit-test-secret";
const NOW = 1_800_000_000;
const key = () =>
  crypto.subtle.importKey("raw", new TextEncoder().encode(SECRET), { name: "HMAC", hash: "SHA-256" }, false, ["verify"]);
const b64url = (bytes: Uint8Array) => btoa(String.fromCharCode(...bytes)).replaceAll("=", "").replaceAll("+", "-").replaceAll("/", "_");
const part = (value: unknown) => b64url(new TextEncoder().encode(JSON.stringify(value)));

/** A token with any header and payload, HMAC-SHA256 signed with `secret` (a valid signature for what it says). */
async function forge(header: unknown, payload: unknown, secret = SECRET): Promise<string> {
  const signingKey = await crypto.subtle.importKey("raw", new TextEncoder().encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const input = `${part(header)}.${part(payload)}`;
  const signature = new Uint8Array(await crypto.subtle.sign("HMAC", signingKey, new TextEncoder().encode(input)));
  return `${input}.${b64url(signature)}`;
}

const valid = { sub: "7", role: "user", exp: NOW + 60 };

describe("verifyHs256", () => {
  it("accepts a token hono/jwt signs, with or without typ, and returns its payload", async () => {
    const token = await sign({ ...valid, iat: NOW - 1, nbf: NOW }, SECRET, "HS256");
    await expect(verifyHs256(token, await key(), NOW)).resolves.toMatchObject(valid);
    await expect(verifyHs256(await forge({ alg: "HS256" }, valid), await key(), NOW)).resolves.toMatchObject(valid);
  });

  it("refuses another key, a changed payload, and a changed or missing signature", async () => {
    const token = await sign(valid, SECRET, "HS256");
    await expect(verifyHs256(await sign(valid, "another", "HS256"), await key(), NOW)).rejects.toThrow();
    const [h, , s] = token.split(".");
    await expect(verifyHs256(`${h}.${part({ ...valid, role: "admin" })}.${s}`, await key(), NOW)).rejects.toThrow();
    await expect(verifyHs256(`${h}.${part(valid)}.${s!.slice(0, -2)}AA`, await key(), NOW)).rejects.toThrow();
    await expect(verifyHs256(`${h}.${part(valid)}.`, await key(), NOW)).rejects.toThrow();
    await expect(verifyHs256(`${h}.${part(valid)}`, await key(), NOW)).rejects.toThrow();
    await expect(verifyHs256(`${token}.extra`, await key(), NOW)).rejects.toThrow();
  });

  it("pins the algorithm and refuses headers it does not understand", async () => {
    for (const header of [
      { alg: "none", typ: "JWT" },
      { alg: "HS512", typ: "JWT" },
      { alg: "hs256" },
      { typ: "JWT" },
      { alg: "HS256", typ: "JOSE+JSON" },
      { alg: "HS256", typ: 1 },
      { alg: "HS256", crit: ["exp"] },
      ["HS256"],
      "HS256",
    ]) {
      // Correctly signed for what they say: only the header is wrong.
      await expect(verifyHs256(await forge(header, valid), await key(), NOW), JSON.stringify(header)).rejects.toThrow();
    }
  });

  it("requires exp in the future, and nbf and iat not in the future", async () => {
    const h = { alg: "HS256", typ: "JWT" };
    for (const payload of [
      { sub: "7", role: "user" },
      { ...valid, exp: NOW },
      { ...valid, exp: "4102444800" },
      { ...valid, nbf: NOW + 1 },
      { ...valid, nbf: "0" },
      { ...valid, iat: NOW + 1 },
      [valid],
      null,
    ]) {
      await expect(verifyHs256(await forge(h, payload), await key(), NOW), JSON.stringify(payload)).rejects.toThrow();
    }
    await expect(verifyHs256(await forge(h, { ...valid, nbf: NOW, iat: NOW }), await key(), NOW)).resolves.toBeTruthy();
  });

  it("refuses text that is not base64url JSON, after a good header was cached", async () => {
    const token = await sign(valid, SECRET, "HS256");
    await verifyHs256(token, await key(), NOW);
    const [h, p, s] = token.split(".");
    for (const bad of [`${h}.${p}.${s}!`, `${h}.!!!.${s}`, `%%%.${p}.${s}`, `.${p}.${s}`, `${h}..${s}`, ""]) {
      await expect(verifyHs256(bad, await key(), NOW), bad).rejects.toThrow();
    }
  });
});
