import { sql } from "drizzle-orm";
import { check, index, integer, primaryKey, sqliteTable, text, uniqueIndex } from "drizzle-orm/sqlite-core";

// Timestamps are ISO 8601 UTC text with milliseconds: they sort lexicographically in time order.
// Money is integer won. Every rule the services enforce is also a constraint here, the last line of defence.

export const BALANCE_LIMIT = 10_000_000;

export const users = sqliteTable(
  "users",
  {
    id: integer("id").primaryKey({ autoIncrement: true }),
    name: text("name").notNull(),
    balance: integer("balance").notNull().default(0),
    createdAt: text("created_at").notNull(),
    updatedAt: text("updated_at").notNull(),
  },
  (t) => [
    check("users_balance_non_negative", sql`${t.balance} >= 0`),
    // No upper bound here: BALANCE_LIMIT bounds charges (their guarded UPDATE), and a refund is never
    // refused for it.
    index("users_newest_idx").on(t.createdAt, t.id),
  ],
);

export const walletTransactions = sqliteTable(
  "wallet_transactions",
  {
    id: integer("id").primaryKey({ autoIncrement: true }),
    userId: integer("user_id").notNull().references(() => users.id),
    type: text("type", { enum: ["CHARGE", "PAYMENT", "REFUND"] }).notNull(),
    amount: integer("amount").notNull(),
    balanceAfter: integer("balance_after").notNull(),
    orderId: integer("order_id").references(() => orders.id),
    createdAt: text("created_at").notNull(),
    // For a charge made under an Idempotency-Key: the claim's effect reference, so that however many
    // times the request runs (a retry taking over a slow or crashed first run), it is applied once.
    requestRef: text("request_ref"),
  },
  (t) => [
    uniqueIndex("wallet_transactions_request_ref_uq").on(t.requestRef),
    check("wallet_transactions_type", sql`${t.type} IN ('CHARGE', 'PAYMENT', 'REFUND')`),
    check(
      "wallet_transactions_amount_sign",
      sql`(${t.type} = 'PAYMENT' AND ${t.amount} < 0) OR (${t.type} <> 'PAYMENT' AND ${t.amount} > 0)`,
    ),
    check("wallet_transactions_balance_after", sql`${t.balanceAfter} >= 0`),
    index("wallet_transactions_user_newest_idx").on(t.userId, t.createdAt, t.id),
    // A cancelled order is refunded once, however many cancels race.
    uniqueIndex("wallet_transactions_one_refund_uq").on(t.orderId).where(sql`${t.type} = 'REFUND'`),
  ],
);

export const products = sqliteTable(
  "products",
  {
    id: integer("id").primaryKey({ autoIncrement: true }),
    name: text("name").notNull(),
    price: integer("price").notNull(),
    stock: integer("stock").notNull(),
    // At most this many units per user over their non-cancelled orders; null: no limit.
    maxPerUser: integer("max_per_user"),
    createdAt: text("created_at").notNull(),
    updatedAt: text("updated_at").notNull(),
    // The latest admin stock or limit change, as its stock object named it: a later life of that object
    // tells from it whether a write an earlier life left in flight is in what it read (src/inventory/product-stock.ts).
    adminWriteId: text("admin_write_id"),
  },
  (t) => [
    check("products_price_non_negative", sql`${t.price} >= 0`),
    check("products_stock_non_negative", sql`${t.stock} >= 0`),
    check("products_max_per_user", sql`${t.maxPerUser} IS NULL OR ${t.maxPerUser} >= 1`),
    index("products_newest_idx").on(t.createdAt, t.id),
  ],
);

export const productSalesDaily = sqliteTable(
  "product_sales_daily",
  {
    statDate: text("stat_date").notNull(),
    productId: integer("product_id").notNull().references(() => products.id),
    quantity: integer("quantity").notNull(),
  },
  (t) => [
    primaryKey({ columns: [t.statDate, t.productId] }),
    check("product_sales_daily_quantity", sql`${t.quantity} >= 0`),
  ],
);

// One row per order the stats consumer has counted, written in the same batch as the upsert,
// so a redelivered message is recognised and counted once.
export const statsCountedOrders = sqliteTable("stats_counted_orders", {
  orderId: integer("order_id").primaryKey(),
  countedAt: text("counted_at").notNull(),
});

// The same for cancellations: an order's units leave the statistics once.
export const statsCountedCancellations = sqliteTable("stats_counted_cancellations", {
  orderId: integer("order_id").primaryKey(),
  countedAt: text("counted_at").notNull(),
});

// Units of a product a user holds in non-cancelled orders, kept in each order's and each cancellation's
// batch. The product's limit is copied in on every purchase, so the CHECK is the last line of defence
// for purchase limits as CHECK (stock >= 0) is for stock.
export const userProductPurchases = sqliteTable(
  "user_product_purchases",
  {
    userId: integer("user_id").notNull().references(() => users.id),
    productId: integer("product_id").notNull().references(() => products.id),
    quantity: integer("quantity").notNull(),
    maxPerUser: integer("max_per_user"),
  },
  (t) => [
    primaryKey({ columns: [t.userId, t.productId] }),
    check("user_product_purchases_quantity", sql`${t.quantity} >= 0`),
    check("user_product_purchases_within_limit", sql`${t.maxPerUser} IS NULL OR ${t.quantity} <= ${t.maxPerUser}`),
  ],
);

export const coupons = sqliteTable(
  "coupons",
  {
    id: integer("id").primaryKey({ autoIncrement: true }),
    name: text("name").notNull(),
    discountType: text("discount_type", { enum: ["FIXED", "PERCENT"] }).notNull(),
    discountValue: integer("discount_value").notNull(),
    minOrderAmount: integer("min_order_amount").notNull().default(0),
    // PERCENT only: the discount never passes it.
    maxDiscountAmount: integer("max_discount_amount"),
    totalQuantity: integer("total_quantity").notNull(),
    issuedCount: integer("issued_count").notNull().default(0),
    issueStartsAt: text("issue_starts_at"),
    issueEndsAt: text("issue_ends_at"),
    validDays: integer("valid_days").notNull(),
    createdAt: text("created_at").notNull(),
    // How many gate objects serve it (1..64, fixed at creation): src/coupons/shards.ts.
    shards: integer("shards").notNull().default(1),
  },
  (t) => [
    check("coupons_discount_type", sql`${t.discountType} IN ('FIXED', 'PERCENT')`),
    check(
      "coupons_discount_value",
      sql`${t.discountValue} >= 1 AND (${t.discountType} = 'FIXED' OR ${t.discountValue} <= 100)`,
    ),
    check("coupons_min_order_amount", sql`${t.minOrderAmount} >= 0`),
    check(
      "coupons_max_discount_amount",
      sql`${t.maxDiscountAmount} IS NULL OR (${t.discountType} = 'PERCENT' AND ${t.maxDiscountAmount} >= 1)`,
    ),
    check("coupons_total_quantity", sql`${t.totalQuantity} >= 1`),
    check("coupons_issued_within_total", sql`${t.issuedCount} >= 0 AND ${t.issuedCount} <= ${t.totalQuantity}`),
    check("coupons_valid_days", sql`${t.validDays} >= 1`),
  ],
);

/**
 * Of a coupon served by several gate objects (shards > 1), each shard's own issued count: bumped by the same
 * group commit that bumps `coupons.issued_count`, so a shard waking can compare its count with D1's in one
 * row read, as a single gate compares the coupon's (src/coupons/coupon-gate.ts). Sums to issued_count.
 */
export const couponShardCounts = sqliteTable(
  "coupon_shard_counts",
  {
    couponId: integer("coupon_id").notNull().references(() => coupons.id),
    shard: integer("shard").notNull(),
    issuedCount: integer("issued_count").notNull(),
  },
  (t) => [
    primaryKey({ columns: [t.couponId, t.shard] }),
    check("coupon_shard_counts_shard", sql`${t.shard} >= 0 AND ${t.shard} < 64`),
    check("coupon_shard_counts_issued", sql`${t.issuedCount} >= 0`),
  ],
);

export const userCoupons = sqliteTable(
  "user_coupons",
  {
    id: integer("id").primaryKey({ autoIncrement: true }),
    couponId: integer("coupon_id").notNull().references(() => coupons.id),
    userId: integer("user_id").notNull().references(() => users.id),
    status: text("status", { enum: ["AVAILABLE", "USED", "EXPIRED"] }).notNull().default("AVAILABLE"),
    issuedAt: text("issued_at").notNull(),
    expiresAt: text("expires_at").notNull(),
    usedAt: text("used_at"),
    orderId: integer("order_id"),
  },
  (t) => [
    check("user_coupons_status", sql`${t.status} IN ('AVAILABLE', 'USED', 'EXPIRED')`),
    uniqueIndex("user_coupons_coupon_user_uq").on(t.couponId, t.userId),
    index("user_coupons_user_status_idx").on(t.userId, t.status, t.expiresAt),
  ],
);

export const orders = sqliteTable(
  "orders",
  {
    id: integer("id").primaryKey({ autoIncrement: true }),
    // Chosen by the Worker before the batch, so statements in the same batch (and a stock
    // reservation that outlived its Worker) can find the order without knowing its id.
    orderKey: text("order_key").notNull(),
    userId: integer("user_id").notNull().references(() => users.id),
    status: text("status", { enum: ["COMPLETED", "CANCELLED"] }).notNull().default("COMPLETED"),
    totalAmount: integer("total_amount").notNull(),
    discountAmount: integer("discount_amount").notNull(),
    paidAmount: integer("paid_amount").notNull(),
    userCouponId: integer("user_coupon_id").references(() => userCoupons.id),
    createdAt: text("created_at").notNull(),
    cancelledAt: text("cancelled_at"),
    cancelReason: text("cancel_reason"),
  },
  (t) => [
    check("orders_status", sql`${t.status} IN ('COMPLETED', 'CANCELLED')`),
    check("orders_cancelled_at", sql`(${t.status} = 'CANCELLED') = (${t.cancelledAt} IS NOT NULL)`),
    check(
      "orders_amounts",
      sql`${t.totalAmount} >= 0 AND ${t.discountAmount} >= 0 AND ${t.discountAmount} <= ${t.totalAmount} AND ${t.paidAmount} = ${t.totalAmount} - ${t.discountAmount}`,
    ),
    uniqueIndex("orders_order_key_uq").on(t.orderKey),
    // A user coupon pays for at most one order at a time (a cancellation gives it back).
    uniqueIndex("orders_user_coupon_uq").on(t.userCouponId).where(sql`${t.status} = 'COMPLETED'`),
    index("orders_user_newest_idx").on(t.userId, t.createdAt, t.id),
  ],
);

export const orderItems = sqliteTable(
  "order_items",
  {
    id: integer("id").primaryKey({ autoIncrement: true }),
    orderId: integer("order_id").notNull().references(() => orders.id),
    productId: integer("product_id").notNull().references(() => products.id),
    name: text("name").notNull(),
    unitPrice: integer("unit_price").notNull(),
    quantity: integer("quantity").notNull(),
    amount: integer("amount").notNull(),
  },
  (t) => [
    check("order_items_quantity", sql`${t.quantity} >= 1 AND ${t.quantity} <= 100`),
    check("order_items_amount", sql`${t.amount} = ${t.unitPrice} * ${t.quantity}`),
    uniqueIndex("order_items_order_product_uq").on(t.orderId, t.productId),
  ],
);

// Transactional outbox: written in the order's batch, moved to a queue after commit (`dispatched_at`),
// finished by its consumer (`completed_at`). The cron relay re-sends rows never dispatched, and rows
// dispatched long ago but never completed (a message lost after the queue took it).
export const outbox = sqliteTable(
  "outbox",
  {
    id: integer("id").primaryKey({ autoIncrement: true }),
    orderId: integer("order_id").notNull().references(() => orders.id),
    topic: text("topic", { enum: ["stats", "export"] }).notNull(),
    // What happened to the order: placed, or cancelled. Each has its own stats and export message.
    event: text("event", { enum: ["PLACED", "CANCELLED"] }).notNull().default("PLACED"),
    payload: text("payload").notNull(),
    createdAt: text("created_at").notNull(),
    dispatchedAt: text("dispatched_at"),
    completedAt: text("completed_at"),
  },
  (t) => [
    check("outbox_topic", sql`${t.topic} IN ('stats', 'export')`),
    check("outbox_event", sql`${t.event} IN ('PLACED', 'CANCELLED')`),
    uniqueIndex("outbox_order_topic_event_uq").on(t.orderId, t.topic, t.event),
    index("outbox_undispatched_idx").on(t.dispatchedAt, t.createdAt),
    // Only unfinished rows are indexed: the relay's scans stay proportional to the work in flight.
    index("outbox_incomplete_idx").on(t.dispatchedAt).where(sql`${t.completedAt} IS NULL`),
  ],
);

// Delivery state of each order's export to the data platform, as admins see it.
export const orderExports = sqliteTable(
  "order_exports",
  {
    id: integer("id").primaryKey({ autoIncrement: true }),
    orderId: integer("order_id").notNull().references(() => orders.id),
    event: text("event", { enum: ["PLACED", "CANCELLED"] }).notNull().default("PLACED"),
    status: text("status", { enum: ["PENDING", "SENT", "FAILED"] }).notNull().default("PENDING"),
    attempts: integer("attempts").notNull().default(0),
    lastError: text("last_error"),
    createdAt: text("created_at").notNull(),
    updatedAt: text("updated_at").notNull(),
    sentAt: text("sent_at"),
  },
  (t) => [
    check("order_exports_status", sql`${t.status} IN ('PENDING', 'SENT', 'FAILED')`),
    check("order_exports_event", sql`${t.event} IN ('PLACED', 'CANCELLED')`),
    uniqueIndex("order_exports_order_event_uq").on(t.orderId, t.event),
    index("order_exports_status_newest_idx").on(t.status, t.createdAt, t.id),
    index("order_exports_newest_idx").on(t.createdAt, t.id),
  ],
);

export const idempotencyKeys = sqliteTable(
  "idempotency_keys",
  {
    // "user:42" or "admin:0": keys are scoped per caller.
    scope: text("scope").notNull(),
    key: text("key").notNull(),
    requestHash: text("request_hash").notNull(),
    state: text("state", { enum: ["IN_PROGRESS", "DONE"] }).notNull(),
    responseStatus: integer("response_status"),
    responseBody: text("response_body"),
    // While IN_PROGRESS, a claim older than this is considered crashed and may be taken over.
    lockedUntil: text("locked_until").notNull(),
    createdAt: text("created_at").notNull(),
    expiresAt: text("expires_at").notNull(),
    // What the runs before the current claim, in this key's life, may still do (see src/lib/idempotency.ts):
    // NONE (the claim began the life), FAILED (each ended without its effect), UNKNOWN (one crashed or lost
    // its outcome, and may still commit). Rows from before the column are UNKNOWN: the safe assumption.
    earlierRuns: text("earlier_runs", { enum: ["NONE", "FAILED", "UNKNOWN"] }).notNull().default("UNKNOWN"),
    // The request that holds the current claim (random per request), with `locked_until`: two requests that
    // read the same millisecond share a lock time, never an owner. Null on rows from before the column.
    owner: text("owner"),
  },
  (t) => [
    primaryKey({ columns: [t.scope, t.key] }),
    check("idempotency_keys_state", sql`${t.state} IN ('IN_PROGRESS', 'DONE')`),
    index("idempotency_keys_expires_idx").on(t.expiresAt),
  ],
);
