import { consumeExportDeadLetters } from "./export/dead-letter";
import { consumeExports } from "./export/consumer";
import { consumeStats } from "./stats/consumer";
import { systemClock } from "./lib/clock";
import { log } from "./lib/log";
import { returnDeadStatsToOutbox } from "./orders/outbox";

/** One queue handler for the Worker; each queue's consumer lives in its feature folder. */
export async function handleQueue(batch: MessageBatch, env: Env, ctx: ExecutionContext): Promise<void> {
  switch (batch.queue) {
    case "order-stats":
      return consumeStats(batch, env, ctx);
    case "order-export":
      return consumeExports(batch, env, ctx);
    case "order-export-dlq":
      return consumeExportDeadLetters(batch, env, ctx);
    case "order-stats-dlq":
      return returnDeadStatsToOutbox(batch, env.DB, systemClock.now());
    default:
      log("error", "message on a queue without a consumer", { queue: batch.queue, count: batch.messages.length });
      batch.ackAll();
  }
}
