import { DurableObject } from "cloudflare:workers";

/** One per product: reserves stock for orders. Reservation logic lands with the orders feature. */
export class ProductStock extends DurableObject<Env> {}
