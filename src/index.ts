import { createApp } from "./app";
import { handleQueue } from "./queues";
import { handleScheduled } from "./scheduled";

const app = createApp();

export default {
  fetch: app.fetch,
  queue: handleQueue,
  scheduled: handleScheduled,
} satisfies ExportedHandler<Env>;

export { CouponGate } from "./coupons/coupon-gate";
export { ProductStock } from "./inventory/product-stock";
