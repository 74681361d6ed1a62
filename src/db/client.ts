import { drizzle } from "drizzle-orm/d1";
import * as schema from "./schema";
import type { Db } from "../env";

// drizzle() derives its relational config from the whole schema each time it is called, which showed up
// at a few percent of the Worker's CPU when done per request: one instance per D1 binding instead. It
// holds no per-request state, and calls the binding's methods at call time.
const instances = new WeakMap<D1Database, Db>();

export function createDb(d1: D1Database): Db {
  let db = instances.get(d1);
  if (!db) {
    db = drizzle(d1, { schema });
    instances.set(d1, db);
  }
  return db;
}
