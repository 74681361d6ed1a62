import { recountDriftedShards } from "./coupons/issue-ledger";
import { purgeExpiredIdempotencyKeys } from "./lib/idempotency";
import { log } from "./lib/log";
import { positiveIntegerSetting } from "./lib/settings";
import { queuesOf, relayOutbox } from "./orders/outbox";

const relayUnsentOrderEvents = (controller: ScheduledController, env: Env) =>
  relayOutbox(
    env.DB,
    queuesOf(env),
    new Date(controller.scheduledTime),
    positiveIntegerSetting("OUTBOX_RELAY_AFTER_SECONDS", env.OUTBOX_RELAY_AFTER_SECONDS, 30),
    positiveIntegerSetting("OUTBOX_REDELIVER_AFTER_SECONDS", env.OUTBOX_REDELIVER_AFTER_SECONDS, 1800),
  );

const purgeIdempotencyKeys = (controller: ScheduledController, env: Env) =>
  purgeExpiredIdempotencyKeys(env, new Date(controller.scheduledTime));

const recountShards = async (_controller: ScheduledController, env: Env) => {
  const recounted = await recountDriftedShards(env.DB);
  if (recounted > 0) log("warn", "coupon shard counts recounted from their rows", { shardCounts: recounted });
};

/** The minute cron: housekeeping tasks, each isolated so one failing does not stop the others. */
export async function handleScheduled(controller: ScheduledController, env: Env, ctx: ExecutionContext): Promise<void> {
  const tasks: [string, (controller: ScheduledController, env: Env, ctx: ExecutionContext) => Promise<unknown>][] = [
    ["relay unsent order events", relayUnsentOrderEvents],
    ["purge expired idempotency keys", purgeIdempotencyKeys],
    ["recount drifted coupon shard counts", recountShards],
  ];
  for (const [name, task] of tasks) {
    try {
      await task(controller, env, ctx);
    } catch (error) {
      log("error", "scheduled task failed", { task: name, error: String(error) });
    }
  }
}
