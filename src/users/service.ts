import { desc, eq, sql } from "drizzle-orm";
import { users } from "../db/schema";
import { AppError } from "../lib/errors";
import { afterCursor, toPage, type Page, type PageQuery } from "../lib/pagination";
import type { Clock } from "../lib/clock";
import type { Db } from "../env";

export type UserRow = typeof users.$inferSelect;

export interface UserDto {
  id: number;
  name: string;
  balance: number;
  createdAt: string;
}

export const toUserDto = (u: UserRow): UserDto => ({
  id: u.id,
  name: u.name,
  balance: u.balance,
  createdAt: u.createdAt,
});

export async function createUser(db: Db, clock: Clock, name: string): Promise<UserDto> {
  // The user list is keyset-paged newest first: as for products, created_at is never older than the newest
  // user already committed, read inside the INSERT, so a slow create cannot land behind a client's cursor.
  const now = clock.now().toISOString();
  const createdAt = sql<string>`max(${now}, coalesce((SELECT max(${users.createdAt}) FROM ${users}), ''))`;
  const [row] = await db.insert(users).values({ name, balance: 0, createdAt, updatedAt: createdAt }).returning();
  return toUserDto(row!);
}

export async function listUsers(db: Db, page: PageQuery): Promise<Page<UserDto>> {
  const rows = await db
    .select()
    .from(users)
    .where(afterCursor(users.createdAt, users.id, page.cursor, "users"))
    .orderBy(desc(users.createdAt), desc(users.id))
    .limit(page.limit + 1);
  return toPage(rows, page.limit, "users", toUserDto);
}

export async function getUserOrThrow(db: Db, userId: number): Promise<UserRow> {
  const row = await db.query.users.findFirst({ where: eq(users.id, userId) });
  if (!row) throw new AppError("USER_NOT_FOUND", `User ${userId} does not exist`);
  return row;
}
