import { AppError } from "../lib/errors";
import { afterCursorSql, toPage, type Page, type PageQuery } from "../lib/pagination";
import { dispatchOutbox, type OrderEvent, type OrderQueues, type OutboxRow } from "../orders/outbox";

export type ExportStatus = "PENDING" | "SENT" | "FAILED";

export interface ExportDto {
  id: number;
  orderId: number;
  event: OrderEvent;
  status: ExportStatus;
  attempts: number;
  lastError: string | null;
  createdAt: string;
  updatedAt: string;
  sentAt: string | null;
}

interface ExportRow {
  id: number;
  order_id: number;
  event: OrderEvent;
  status: ExportStatus;
  attempts: number;
  last_error: string | null;
  created_at: string;
  updated_at: string;
  sent_at: string | null;
}

const COLUMNS = "id, order_id, event, status, attempts, last_error, created_at, updated_at, sent_at";

const toExportDto = (r: ExportRow): ExportDto => ({
  id: r.id,
  orderId: r.order_id,
  event: r.event,
  status: r.status,
  attempts: r.attempts,
  lastError: r.last_error,
  createdAt: r.created_at,
  updatedAt: r.updated_at,
  sentAt: r.sent_at,
});

export async function listExports(db: D1Database, status: ExportStatus | undefined, page: PageQuery): Promise<Page<ExportDto>> {
  const conditions: string[] = [];
  const params: (string | number)[] = [];
  if (status) {
    conditions.push("status = ?");
    params.push(status);
  }
  const list = `exports:${status ?? "ALL"}`;
  const after = afterCursorSql("created_at", "id", page.cursor, list);
  if (after) {
    conditions.push(after.sql);
    params.push(...after.params);
  }
  const where = conditions.length ? `WHERE ${conditions.join(" AND ")}` : "";
  const { results } = await db
    .prepare(`SELECT ${COLUMNS} FROM order_exports ${where} ORDER BY created_at DESC, id DESC LIMIT ?`)
    .bind(...params, page.limit + 1)
    .all<ExportRow>();
  return toPage(
    results.map((r) => ({ ...r, createdAt: r.created_at })),
    page.limit,
    list,
    toExportDto,
  );
}

/**
 * Puts a FAILED export back to PENDING and queues it again. Its outbox row is reset in the same batch,
 * so if the immediate send fails the cron relay still re-sends it. The export names one order and event:
 * only that event's outbox row is requeued (retrying a cancellation never re-sends the order itself).
 */
export async function retryExport(db: D1Database, queues: OrderQueues, exportId: number, now: Date): Promise<ExportDto> {
  const at = now.toISOString();
  const [, updated] = await db.batch<ExportRow>([
    db
      .prepare(
        `UPDATE outbox SET dispatched_at = NULL, created_at = ?1
         WHERE order_id = (SELECT order_id FROM order_exports WHERE id = ?2 AND status = 'FAILED') AND topic = 'export'
           AND event = (SELECT event FROM order_exports WHERE id = ?2 AND status = 'FAILED')`,
      )
      .bind(at, exportId),
    db
      .prepare(`UPDATE order_exports SET status = 'PENDING', updated_at = ? WHERE id = ? AND status = 'FAILED' RETURNING ${COLUMNS}`)
      .bind(at, exportId),
  ]);
  const row = updated!.results[0];
  if (!row) {
    const exists = await db.prepare("SELECT status FROM order_exports WHERE id = ?").bind(exportId).first<{ status: string }>();
    if (!exists) throw new AppError("EXPORT_NOT_FOUND", `Export ${exportId} does not exist`);
    throw new AppError("EXPORT_NOT_FAILED", `Export ${exportId} is ${exists.status}`);
  }
  const { results } = await db
    .prepare("SELECT id, topic, payload FROM outbox WHERE order_id = ? AND topic = 'export' AND event = ? AND dispatched_at IS NULL")
    .bind(row.order_id, row.event)
    .all<OutboxRow>();
  await dispatchOutbox(db, queues, results, at);
  return toExportDto(row);
}
