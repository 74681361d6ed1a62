import type { DrizzleD1Database } from "drizzle-orm/d1";
import type { Caller } from "./lib/auth";
import type { Clock } from "./lib/clock";
import type * as schema from "./db/schema";

export type Db = DrizzleD1Database<typeof schema>;

/** Per-request values that middleware puts on the Hono context. */
export interface AppVariables {
  requestId: string;
  clock: Clock;
  db: Db;
  caller: Caller;
  /** The `code` of the problem response this request answers with, for the metrics. */
  problemCode?: string;
}

export interface AppEnv {
  Bindings: Env;
  Variables: AppVariables;
}
