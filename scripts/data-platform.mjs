// A stand-in for the external data platform, for local use: accepts POST /orders on 127.0.0.1:8788,
// deduplicates by Idempotency-Key (as a real platform would) and logs each delivery once: a completed
// order arrives as `order-<id>`, its cancellation as `order-<id>-cancel`. GET /orders lists the keys,
// with `count` (all distinct keys), `orders` (completed) and `cancellations`.
//
//   node scripts/data-platform.mjs                 accept everything
//   DATA_PLATFORM_DOWN_UNTIL=<epoch ms> ...        answer 503 until then, to watch retries and dead letters
//   touch .wrangler/data-platform-down             answer 503 while this file exists (toggle an outage live)
import { createServer } from "node:http";
import { existsSync } from "node:fs";

const PORT = Number(process.env.DATA_PLATFORM_PORT ?? 8788);
const DOWN_FILE = ".wrangler/data-platform-down";
const downUntil = Number(process.env.DATA_PLATFORM_DOWN_UNTIL ?? 0);
const received = new Map();
const isCancellation = (key) => key.endsWith("-cancel");

export function startDataPlatform(port = PORT) {
  const server = createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
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
  startDataPlatform();
  console.log(`data platform stand-in on http://127.0.0.1:${PORT}/orders`);
}
