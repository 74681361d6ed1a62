import { z } from "@hono/zod-openapi";
import { and, eq, lt, or, type SQL } from "drizzle-orm";
import type { SQLiteColumn } from "drizzle-orm/sqlite-core";
import { AppError } from "./errors";
import { decimalInteger } from "./openapi";

// Keyset pagination over (created_at DESC, id DESC). The cursor is the last row's key plus the name of
// the list it belongs to (which user's, which filter), opaque to clients (base64url JSON); a cursor from
// another list is refused like a forged one. Because it names a position rather than an offset, rows inserted while a
// client pages (always newer, so earlier in the order) never shift the pages still to come.

export interface CursorKey {
  createdAt: string;
  id: number;
}

const cursorKey = z.tuple([z.string(), z.iso.datetime(), z.number().int().positive()]);

export function encodeCursor(key: CursorKey, list: string): string {
  const json = JSON.stringify([list, key.createdAt, key.id]);
  return btoa(json).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

export function decodeCursor(cursor: string, list: string): CursorKey {
  try {
    if (!/^[A-Za-z0-9_-]{1,512}$/.test(cursor)) throw new Error("not base64url");
    const json = atob(cursor.replaceAll("-", "+").replaceAll("_", "/"));
    const [from, createdAt, id] = cursorKey.parse(JSON.parse(json));
    if (from !== list) throw new Error("a cursor of another list");
    return { createdAt, id };
  } catch {
    throw new AppError("VALIDATION_FAILED", "The cursor is not one this API issued", [
      { path: "cursor", message: "Invalid cursor" },
    ]);
  }
}

export const pageQuery = z.object({
  limit: decimalInteger(1, 100).default(20).openapi({ example: 20, default: 20 }),
  cursor: z.string().max(512).optional().openapi({ description: "Opaque cursor from a previous page's nextCursor" }),
});

export type PageQuery = z.infer<typeof pageQuery>;

export interface Page<T> {
  items: T[];
  nextCursor: string | null;
}

/** Rows fetched with `limit + 1`: the extra row only tells whether another page exists. */
export function toPage<R extends CursorKey, T>(rows: R[], limit: number, list: string, map: (row: R) => T): Page<T> {
  const items = rows.slice(0, limit);
  const last = items.at(-1);
  return {
    items: items.map(map),
    nextCursor: rows.length > limit && last ? encodeCursor({ createdAt: last.createdAt, id: last.id }, list) : null,
  };
}

export function pageSchema<T extends z.ZodTypeAny>(item: T) {
  return z.object({ items: z.array(item), nextCursor: z.string().nullable() });
}

/** The rows after `cursor` in (created_at DESC, id DESC) order. */
export function afterCursor(
  createdAt: SQLiteColumn,
  id: SQLiteColumn,
  cursor: string | undefined,
  list: string,
): SQL | undefined {
  if (cursor === undefined) return undefined;
  const key = decodeCursor(cursor, list);
  return or(lt(createdAt, key.createdAt), and(eq(createdAt, key.createdAt), lt(id, key.id)));
}

/** The same condition for raw SQL: a fragment and its parameters (column names are ours, never input). */
export function afterCursorSql(
  createdAtColumn: string,
  idColumn: string,
  cursor: string | undefined,
  list: string,
): { sql: string; params: [string, string, number] } | undefined {
  if (cursor === undefined) return undefined;
  const key = decodeCursor(cursor, list);
  return {
    sql: `(${createdAtColumn} < ? OR (${createdAtColumn} = ? AND ${idColumn} < ?))`,
    params: [key.createdAt, key.createdAt, key.id],
  };
}
