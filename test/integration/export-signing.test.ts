import { createExecutionContext, createMessageBatch, getQueueResult } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { Webhook } from "standardwebhooks";
import { describe, expect, it } from "vitest";
import worker from "../../src/index";
import type { ExportDeps } from "../../src/export/consumer";
import { recordDeadExports } from "../../src/export/dead-letter";
import { fixedClock } from "../../src/lib/clock";
import { adminToken, call } from "../helpers/api";
import { cancelInD1, placeHeldOrder } from "../helpers/cancellations";
import { deliver, expectNoDelivery, exportRow, platform, seededOrder } from "../helpers/exports";

// Every delivery to the data platform is signed (Standard Webhooks), and the consumer refuses to deliver
// unsigned: a missing or malformed EXPORT_SIGNING_SECRET is a misconfiguration it reports like a missing URL.

interface Delivered {
  headers: Headers;
  body: string;
}

/** A data platform that verifies like the real one would, keeping each raw delivery. */
function verifyingPlatform(clockAt: Date, signingSecret = env.EXPORT_SIGNING_SECRET) {
  const delivered: Delivered[] = [];
  const send = (async (_input: RequestInfo | URL, init?: RequestInit) => {
    delivered.push({ headers: new Headers(init?.headers), body: String(init?.body) });
    return new Response("{}", { status: 200 });
  }) as typeof fetch;
  const clock = fixedClock(clockAt);
  const deps: ExportDeps = { ...platform(200).deps, signingSecret, send, clock };
  return { delivered, deps, clock };
}

/** What the platform's verifier returns for a delivery (throws if the signature does not verify). */
const verified = (d: Delivered, secret = env.EXPORT_SIGNING_SECRET) =>
  new Webhook(secret).verify(d.body, Object.fromEntries(d.headers));

// Whole seconds, so webhook-timestamp is exactly the clock's; current, so the verifier's 5-minute tolerance holds.
const nowInSeconds = () => new Date(Math.floor(Date.now() / 1000) * 1000);

describe("export consumer: signed deliveries", () => {
  it("signs the placed and the cancel delivery: webhook-id is the Idempotency-Key, the timestamp the clock's", async () => {
    const placed = await placeHeldOrder(1);
    const cancellation = await cancelInD1(placed);
    const at = nowInSeconds();
    const { delivered, deps, clock } = verifyingPlatform(at);

    await deliver(placed.placed.export, deps);
    clock.advance(3_000);
    await deliver(cancellation.export, deps);

    expect(delivered).toHaveLength(2);
    const [order, cancel] = delivered as [Delivered, Delivered];
    expect(order.headers.get("webhook-id")).toBe(`order-${placed.order.id}`);
    expect(order.headers.get("webhook-id")).toBe(order.headers.get("Idempotency-Key"));
    expect(order.headers.get("webhook-timestamp")).toBe(String(at.getTime() / 1000));
    // The platform gets the contract's body: the message's own requestId (for tracing) is not part of it.
    const { requestId: _traced, ...placedBody } = placed.placed.export;
    expect(verified(order)).toEqual(placedBody);

    expect(cancel.headers.get("webhook-id")).toBe(`order-${placed.order.id}-cancel`);
    expect(cancel.headers.get("webhook-id")).toBe(cancel.headers.get("Idempotency-Key"));
    expect(cancel.headers.get("webhook-timestamp")).toBe(String(at.getTime() / 1000 + 3));
    expect(verified(cancel)).toEqual(cancellation.export);
    expect(await exportRow(placed.order.id, "CANCELLED")).toMatchObject({ status: "SENT" });
  });

  it("signs each attempt afresh: a retry keeps webhook-id and carries its own timestamp", async () => {
    const { exportId: _, ...event } = await seededOrder();
    const at = nowInSeconds();
    const { delivered, deps, clock } = verifyingPlatform(at);
    let answers = 0;
    const refuseOnce = (async (input: RequestInfo | URL, init?: RequestInit) => {
      const response = await deps.send(input, init);
      return answers++ === 0 ? new Response("busy", { status: 503 }) : response;
    }) as typeof fetch;

    expect((await deliver(event, { ...deps, send: refuseOnce })).retryMessages).toHaveLength(1);
    clock.advance(10_000);
    expect((await deliver(event, { ...deps, send: refuseOnce }, 2)).explicitAcks).toHaveLength(1);

    const [first, second] = delivered as [Delivered, Delivered];
    expect(second.headers.get("webhook-id")).toBe(first.headers.get("webhook-id"));
    expect(Number(second.headers.get("webhook-timestamp"))).toBe(Number(first.headers.get("webhook-timestamp")) + 10);
    expect(verified(second)).toEqual(event);
  });

  it("while rotating (\"whsec_new whsec_old\") each delivery verifies with either secret", async () => {
    const { exportId: _, ...event } = await seededOrder();
    const old = `whsec_${btoa("o".repeat(32))}`;
    const { delivered, deps } = verifyingPlatform(nowInSeconds(), `${env.EXPORT_SIGNING_SECRET} ${old}`);

    await deliver(event, deps);
    const [d] = delivered as [Delivered];
    expect(d.headers.get("webhook-signature")!.split(" ")).toHaveLength(2);
    expect(verified(d)).toEqual(event);
    expect(verified(d, old)).toEqual(event);
  });
});

describe("export consumer without a usable EXPORT_SIGNING_SECRET", () => {
  it.each([
    [undefined, "EXPORT_SIGNING_SECRET is not set"],
    ["whsec_change-me", "EXPORT_SIGNING_SECRET is malformed: expected whsec_ and the base64 of 24 to 64 bytes"],
  ])("secret %j: POSTs nothing, backs off, and the export's last_error says why", async (signingSecret, reason) => {
    await expectNoDelivery({ signingSecret }, reason);
  });

  it("through the Worker's queue handler, and it ends FAILED with the reason via the dead letter", async () => {
    const { exportId, ...event } = await seededOrder();
    const unsigned = { ...env, EXPORT_SIGNING_SECRET: undefined } as unknown as Env;
    const batch = createMessageBatch("order-export", [{ id: `m-${crypto.randomUUID()}`, timestamp: new Date(), attempts: 1, body: event }]);
    const ctx = createExecutionContext();
    await worker.queue!(batch, unsigned, ctx);
    expect((await getQueueResult(batch, ctx)).retryMessages).toHaveLength(1);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "PENDING", last_error: "EXPORT_SIGNING_SECRET is not set" });

    const dead = createMessageBatch("order-export-dlq", [{ id: `dead-${crypto.randomUUID()}`, timestamp: new Date(), attempts: 1, body: event }]);
    await recordDeadExports(dead, env.DB, fixedClock(new Date()));
    await getQueueResult(dead, createExecutionContext());
    const failed = await call("GET", "/api/admin/exports?status=failed&limit=100", { token: await adminToken() });
    expect(failed.body.items).toContainEqual(
      expect.objectContaining({ id: exportId, status: "FAILED", lastError: "EXPORT_SIGNING_SECRET is not set" }),
    );
  });
});
