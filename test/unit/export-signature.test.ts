import { Webhook } from "standardwebhooks";
import { describe, expect, it } from "vitest";
import { deliverySigner, signingKeysOf, type DeliverySigner } from "../../src/export/signature";

// The signatures on exports, checked with the Standard Webhooks reference library (the `standardwebhooks`
// npm package), the way the data platform verifies them.

const secretOf = (bytes: number, fill: number) => `whsec_${btoa(String.fromCharCode(...new Array(bytes).fill(fill)))}`;
const SECRET = secretOf(32, 1);
const OLD_SECRET = secretOf(32, 2);

async function signerFor(value: string): Promise<DeliverySigner> {
  const signer = await deliverySigner(value);
  if ("problem" in signer) throw new Error(signer.problem);
  return signer;
}

const body = JSON.stringify({ orderId: 7, items: [{ name: "머그 ☕ \"large\"", amount: 5000 }] });

describe("export signatures", () => {
  it("are what the reference library computes, and verify with it", async () => {
    const at = new Date("2026-11-20T10:00:00.999Z");
    const headers = await (await signerFor(SECRET)).sign("order-7", at, body);
    expect(headers["webhook-id"]).toBe("order-7");
    expect(headers["webhook-timestamp"]).toBe("1795168800");
    expect(headers["webhook-signature"]).toBe(new Webhook(SECRET).sign("order-7", at, body));

    const now = await (await signerFor(SECRET)).sign("order-7-cancel", new Date(), body);
    expect(new Webhook(SECRET).verify(body, { ...now })).toEqual(JSON.parse(body));
  });

  it("do not verify for another body, id, timestamp or secret", async () => {
    const headers = await (await signerFor(SECRET)).sign("order-7", new Date(), body);
    const webhook = new Webhook(SECRET);
    expect(() => webhook.verify(body.replace("5000", "5001"), { ...headers })).toThrow("No matching signature");
    expect(() => webhook.verify(body, { ...headers, "webhook-id": "order-8" })).toThrow("No matching signature");
    const later = String(Number(headers["webhook-timestamp"]) + 1);
    expect(() => webhook.verify(body, { ...headers, "webhook-timestamp": later })).toThrow("No matching signature");
    expect(() => new Webhook(OLD_SECRET).verify(body, { ...headers })).toThrow("No matching signature");
  });

  it("while two secrets overlap, carry one v1 signature per secret, each verifying with its own secret", async () => {
    const headers = await (await signerFor(`${SECRET}  ${OLD_SECRET}`)).sign("order-7", new Date(), body);
    const signatures = headers["webhook-signature"].split(" ");
    expect(signatures).toHaveLength(2);
    expect(signatures.every((s) => /^v1,[A-Za-z0-9+/]{43}=$/.test(s))).toBe(true);
    expect(new Webhook(SECRET).verify(body, { ...headers })).toEqual(JSON.parse(body));
    expect(new Webhook(OLD_SECRET).verify(body, { ...headers })).toEqual(JSON.parse(body));
    expect(() => new Webhook(secretOf(32, 3)).verify(body, { ...headers })).toThrow("No matching signature");
  });

  it.each([
    [undefined, "EXPORT_SIGNING_SECRET is not set"],
    ["", "EXPORT_SIGNING_SECRET is not set"],
    ["   ", "EXPORT_SIGNING_SECRET is not set"],
    [SECRET.slice("whsec_".length), "EXPORT_SIGNING_SECRET is malformed"],
    ["whsec_", "EXPORT_SIGNING_SECRET is malformed"],
    ["whsec_change-me", "EXPORT_SIGNING_SECRET is malformed"],
    [`${SECRET.slice(0, -1)}`, "EXPORT_SIGNING_SECRET is malformed"],
    [secretOf(16, 1), "EXPORT_SIGNING_SECRET is malformed"],
    [secretOf(65, 1), "EXPORT_SIGNING_SECRET is malformed"],
    [`${SECRET} whsec_change-me`, "EXPORT_SIGNING_SECRET is malformed (secret 2 of 2)"],
  ])("%j cannot sign: the reason says so without quoting the secret", async (value, reason) => {
    const result = signingKeysOf(value);
    expect(result).toEqual({ problem: expect.stringContaining(reason) });
    expect(await deliverySigner(value)).toEqual(result);
    const { problem } = result as { problem: string };
    expect(problem).not.toContain("change-me");
    expect(problem).not.toContain(SECRET.slice(6, 20));
  });

  it("accepts the shortest and longest keys the specification allows", () => {
    expect(signingKeysOf(secretOf(24, 9))).toEqual([new Uint8Array(24).fill(9)]);
    expect(signingKeysOf(secretOf(64, 9))).toEqual([new Uint8Array(64).fill(9)]);
  });
});
