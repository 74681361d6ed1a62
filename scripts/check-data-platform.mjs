// Checks that the local data-platform stand-in verifies signatures as the real platform would: it accepts a
// delivery signed by the Worker's own signer (src/export/signature.ts) and answers 401, recording nothing, to an
// unsigned, tampered, stale or wrongly keyed one; while two secrets overlap it accepts either. Run by .ci/run
// (`npx node`, for the Node 22 that runs the TypeScript signer as is); exits 1 on the first failure.
import assert from "node:assert/strict";
import { once } from "node:events";
import { deliverySigner } from "../src/export/signature.ts";
import { startDataPlatform } from "./data-platform.mjs";
import { newSigningSecret } from "./local.mjs";

const quiet = console.log;
console.log = () => {}; // the stand-in's per-delivery lines

async function standIn(secret) {
  const server = startDataPlatform(0, { secret });
  await once(server, "listening");
  const base = `http://127.0.0.1:${server.address().port}`;
  return {
    post: (headers, body) => fetch(`${base}/orders`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body }),
    keys: async () => (await (await fetch(`${base}/orders`)).json()).keys,
    close: () => server.close(),
  };
}

async function signed(secret, id, body, at = new Date()) {
  const signer = await deliverySigner(secret);
  assert.ok(!("problem" in signer), signer.problem);
  return { "Idempotency-Key": id, ...(await signer.sign(id, at, body)) };
}

const secret = newSigningSecret();
const other = newSigningSecret();
const body = JSON.stringify({ orderId: 1, userId: 2, items: [{ name: "머그 ☕", amount: 5000 }], paidAmount: 5000 });
const checks = [
  ["a good signature: 201, recorded once", async (p) => {
    assert.equal((await p.post(await signed(secret, "order-1", body), body)).status, 201);
    assert.equal((await p.post(await signed(secret, "order-1", body), body)).status, 200);
    assert.deepEqual(await p.keys(), ["order-1"]);
  }],
  ["no signature headers: 401", async (p) => {
    assert.equal((await p.post({ "Idempotency-Key": "order-2" }, body)).status, 401);
  }],
  ["a tampered body: 401", async (p) => {
    assert.equal((await p.post(await signed(secret, "order-3", body), body.replace("5000", "1"))).status, 401);
  }],
  ["another webhook-id than signed: 401", async (p) => {
    assert.equal((await p.post({ ...(await signed(secret, "order-4", body)), "webhook-id": "order-5" }, body)).status, 401);
  }],
  ["signed with another secret: 401", async (p) => {
    assert.equal((await p.post(await signed(other, "order-6", body), body)).status, 401);
  }],
  ["signed ten minutes ago: 401", async (p) => {
    assert.equal((await p.post(await signed(secret, "order-7", body, new Date(Date.now() - 600_000)), body)).status, 401);
  }],
  ["nothing refused was recorded", async (p) => {
    assert.deepEqual(await p.keys(), ["order-1"]);
  }],
];

let failed = 0;
const p = await standIn(secret);
for (const [name, check] of checks) {
  try {
    await check(p);
    quiet(`PASS  ${name}`);
  } catch (error) {
    failed++;
    quiet(`FAIL  ${name}: ${error.message}`);
  }
}
p.close();

// Rotation: the Worker signs with "new old"; a platform that knows either secret accepts the delivery.
for (const [name, platformSecret, workerSecret] of [
  ["rotation: a platform knowing only the new secret accepts a delivery signed with both", secret, `${secret} ${other}`],
  ["rotation: a platform knowing only the old secret accepts a delivery signed with both", other, `${secret} ${other}`],
  ["rotation: a platform knowing both accepts a delivery signed with the old only", `${secret} ${other}`, other],
]) {
  const rotating = await standIn(platformSecret);
  try {
    assert.equal((await rotating.post(await signed(workerSecret, "order-9", body), body)).status, 201);
    quiet(`PASS  ${name}`);
  } catch (error) {
    failed++;
    quiet(`FAIL  ${name}: ${error.message}`);
  } finally {
    rotating.close();
  }
}

for (const bad of [undefined, "", "whsec_"]) {
  try {
    startDataPlatform(0, { secret: bad }).close();
    failed++;
    quiet(`FAIL  a stand-in without a usable secret (${JSON.stringify(bad)}) started`);
  } catch {
    quiet(`PASS  a stand-in without a usable secret (${JSON.stringify(bad)}) refuses to start`);
  }
}

quiet(failed ? `${failed} check(s) FAILED` : "data-platform stand-in: all signature checks pass");
process.exit(failed ? 1 : 0);
