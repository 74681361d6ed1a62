// A stand-in for the external data platform, for local use: accepts POST /orders on 127.0.0.1:8788, verifies
// every delivery's Standard Webhooks signature (with `standardwebhooks`, the reference library) and answers 401
// to a missing or bad one, so a broken signer shows up as retries and dead letters, as it would at the real
// platform. It deduplicates by Idempotency-Key (as a real platform would) and logs each delivery once: a
// completed order arrives as `order-<id>`, its cancellation as `order-<id>-cancel`. GET /orders lists the keys,
// with `count` (all distinct keys), `orders` (completed) and `cancellations`.
//
//   node scripts/data-platform.mjs                 accept every correctly signed delivery (the secret(s) from
//                                                  EXPORT_SIGNING_SECRET in the environment, else in .dev.vars)
//   DATA_PLATFORM_DOWN_UNTIL=<epoch ms> ...        answer 503 until then, to watch retries and dead letters
//   touch .wrangler/data-platform-down             answer 503 while this file exists (toggle an outage live)
import { createServer } from "node:http";
import { existsSync } from "node:fs";
import { Webhook } from "standardwebhooks";
import { ensureDevVars, readDevVars } from "./local.mjs";

const PORT = Number(process.env.DATA_PLATFORM_PORT ?? 8788);
const DOWN_FILE = ".wrangler/data-platform-down";
const downUntil = Number(process.env.DATA_PLATFORM_DOWN_UNTIL ?? 0);
const isCancellation = (key) => key.endsWith("-cancel");

/**
 * One verifier per secret in `secret` (EXPORT_SIGNING_SECRET: "whsec_..." or, while rotating, several separated
 * by spaces): a delivery is genuine if any of them verifies it, as at a platform that knows both secrets.
 */
function verifiersOf(secret) {
  const secrets = typeof secret === "string" ? secret.trim().split(/\s+/).filter(Boolean) : [];
  if (secrets.length === 0) throw new Error("the data-platform stand-in needs EXPORT_SIGNING_SECRET to verify deliveries");
  return secrets.map((s, i) => {
    try {
      return new Webhook(s);
    } catch {
      throw new Error(`EXPORT_SIGNING_SECRET is malformed (secret ${i + 1} of ${secrets.length})`);
    }
  });
}

/** null if some secret verifies the delivery, else why not. */
function signatureProblem(verifiers, body, headers) {
  let problem = "no secret";
  for (const webhook of verifiers) {
    try {
      webhook.verify(body, headers, { jsonParse: false });
      return null;
    } catch (error) {
      problem = error.message;
    }
  }
  return problem;
}

/** `secret`: the EXPORT_SIGNING_SECRET the Worker signs with (required: the stand-in never accepts unsigned). */
export function startDataPlatform(port = PORT, { secret } = {}) {
  const verifiers = verifiersOf(secret);
  const received = new Map();
  const server = createServer((req, res) => {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => {
      if (req.method === "GET" && req.url === "/orders") {
        res.writeHead(200, { "Content-Type": "application/json" });
        const keys = [...received.keys()];
        const cancellations = keys.filter(isCancellation).length;
        res.end(JSON.stringify({ count: keys.length, orders: keys.length - cancellations, cancellations, keys }));
        return;
      }
      if (req.method !== "POST" || req.url !== "/orders") {
        res.writeHead(404).end();
        return;
      }
      if (Date.now() < downUntil || existsSync(DOWN_FILE)) {
        res.writeHead(503).end("data platform is down (simulated)");
        return;
      }
      // The signature covers the raw bytes: decode them whole (a chunk may end inside a UTF-8 character).
      const body = Buffer.concat(chunks).toString("utf8");
      const problem = signatureProblem(verifiers, body, req.headers);
      if (problem) {
        console.log(JSON.stringify({ msg: "data platform refused a delivery: bad signature", id: req.headers["webhook-id"], problem }));
        res.writeHead(401).end(`bad signature: ${problem}`);
        return;
      }
      const key = req.headers["idempotency-key"];
      if (typeof key !== "string" || key.length === 0) {
        res.writeHead(400).end("Idempotency-Key required");
        return;
      }
      const duplicate = received.has(key);
      if (!duplicate) received.set(key, body);
      const msg = isCancellation(key) ? "data platform received cancellation" : "data platform received order";
      console.log(JSON.stringify({ msg, key, duplicate, total: received.size }));
      res.writeHead(duplicate ? 200 : 201, { "Content-Type": "application/json" });
      res.end(JSON.stringify({ key, duplicate }));
    });
  });
  server.listen(port, "127.0.0.1");
  return server;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  ensureDevVars();
  startDataPlatform(PORT, { secret: process.env.EXPORT_SIGNING_SECRET ?? readDevVars().EXPORT_SIGNING_SECRET });
  console.log(`data platform stand-in on http://127.0.0.1:${PORT}/orders`);
}
