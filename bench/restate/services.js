// The order saga of our engine, written for Restate: one Node process serves the three
// participants and the saga on one HTTP/2 endpoint that restate-server calls.
//
// Each participant keeps its state in Restate (virtual-object state), the analog of its
// PostgreSQL tables: inventory per SKU (stock and the reservations held against it), payment per
// customer (balance and charges), shipping per order (the shipment). A refusal is a business
// failure and is thrown as a TerminalError, which Restate does not retry.
//
//   node services.js            (listens on 127.0.0.1:9080, or $SERVICES_PORT)
"use strict";
const http2 = require("node:http2");
const restate = require("@restatedev/restate-sdk");
const { TerminalError } = restate;

// Our demo data (migrations/*/1001_demo_*.sql). An object with no state yet starts from it, so
// no seeding step is needed.
const DEMO_STOCK = { WIDGET: 1000000, GADGET: 1000000, LIMITED: 1, SOLDOUT: 0 };
const DEMO_ACCOUNTS = {
  alice: { balanceCents: 100000000, currency: "EUR" },
  bob: { balanceCents: 100000000, currency: "EUR" },
  carol: { balanceCents: 500, currency: "EUR" },
};
// Our shipping service's default deny-list (SHIPPING_DENIED_COUNTRIES).
const DENIED_COUNTRIES = new Set(["AQ", "BV"]);

// Keyed by SKU. Handlers of one key run one at a time, as our row lock on the SKU's stock row.
const inventory = restate.object({
  name: "inventory",
  handlers: {
    async reserve(ctx, { orderId, quantity }) {
      const available = (await ctx.get("available")) ?? DEMO_STOCK[ctx.key];
      if (available === undefined) throw new TerminalError(`unknown SKU ${ctx.key}`);
      if (available < quantity) {
        throw new TerminalError(
          `insufficient stock for ${ctx.key}: ${quantity} requested, ${available} available`
        );
      }
      ctx.set("available", available - quantity);
      ctx.set(`order:${orderId}`, { status: "reserved", quantity });
    },
    async release(ctx, { orderId }) {
      const reservation = await ctx.get(`order:${orderId}`);
      // Nothing reserved for this order (or already released): nothing to release.
      if (reservation?.status !== "reserved") return;
      const available = (await ctx.get("available")) ?? DEMO_STOCK[ctx.key];
      ctx.set("available", available + reservation.quantity);
      ctx.set(`order:${orderId}`, { ...reservation, status: "released" });
    },
  },
});

// Keyed by customer id, as our accounts table.
const payment = restate.object({
  name: "payment",
  handlers: {
    async charge(ctx, { orderId, amountCents, currency }) {
      const account = (await ctx.get("account")) ?? DEMO_ACCOUNTS[ctx.key];
      if (account === undefined) throw new TerminalError(`unknown customer ${ctx.key}`);
      if (account.currency !== currency) {
        throw new TerminalError(`the account is in ${account.currency}, the order in ${currency}`);
      }
      if (account.balanceCents < amountCents) {
        throw new TerminalError(
          `insufficient funds: balance ${account.balanceCents}, amount ${amountCents}`
        );
      }
      ctx.set("account", { ...account, balanceCents: account.balanceCents - amountCents });
      ctx.set(`order:${orderId}`, { status: "charged", amountCents });
    },
    async refund(ctx, { orderId }) {
      const charge = await ctx.get(`order:${orderId}`);
      // No charge for this order (or already refunded): nothing to refund.
      if (charge?.status !== "charged") return;
      const account = (await ctx.get("account")) ?? DEMO_ACCOUNTS[ctx.key];
      ctx.set("account", { ...account, balanceCents: account.balanceCents + charge.amountCents });
      ctx.set(`order:${orderId}`, { ...charge, status: "refunded" });
    },
  },
});

// Keyed by order id, as our shipments table. The last step, so it has no compensation.
const shipping = restate.object({
  name: "shipping",
  handlers: {
    async schedule(ctx, { address, items }) {
      if (DENIED_COUNTRIES.has(address.country)) {
        throw new TerminalError(`destination country ${address.country} is on the deny-list`);
      }
      ctx.set("shipment", { status: "scheduled", address, items });
    },
  },
});

// The saga, keyed by order id: a workflow runs once per key, as our one saga per order. Each
// step is a durable call; Restate's journal of this handler is the saga's state. Compensations
// of the steps that finished run in reverse order when a later step is refused.
const order = restate.workflow({
  name: "order",
  handlers: {
    async run(ctx, o) {
      const orderId = ctx.key;
      const compensations = [];
      const steps = [
        ...o.items.map((item) => ({
          run: () => ctx.objectClient(inventory, item.sku).reserve({ orderId, quantity: item.quantity }),
          undo: { name: `release ${item.sku}`, run: () => ctx.objectClient(inventory, item.sku).release({ orderId }) },
        })),
        {
          run: () =>
            ctx.objectClient(payment, o.customerId).charge({ orderId, amountCents: o.totalCents, currency: o.currency }),
          undo: { name: "refund", run: () => ctx.objectClient(payment, o.customerId).refund({ orderId }) },
        },
        { run: () => ctx.objectClient(shipping, orderId).schedule({ address: o.shippingAddress, items: o.items }) },
      ];
      try {
        for (const step of steps) {
          await step.run();
          if (step.undo) compensations.push(step.undo);
        }
      } catch (e) {
        if (!(e instanceof TerminalError)) throw e; // not a refusal: let Restate retry
        const undone = [];
        for (const undo of compensations.reverse()) {
          await undo.run();
          undone.push(undo.name);
        }
        return { status: "compensated", reason: e.message, compensations: undone };
      }
      return { status: "completed" };
    },
  },
});

// Stateless, for scripts/restate-bench.sh to see that the ingress routes to this deployment
// (and to open the server's connection to us) before the first order is timed.
const ping = restate.service({ name: "ping", handlers: { async ping() { return "pong"; } } });

const port = Number(process.env.SERVICES_PORT ?? 9080);
const handler = restate.endpoint().bind(inventory).bind(payment).bind(shipping).bind(order).bind(ping).http2Handler();
// Our own HTTP/2 server instead of endpoint.listen(), only to bind to loopback (listen() binds
// every interface).
http2.createServer(handler).listen(port, "127.0.0.1", () => {
  console.log(`services listening on 127.0.0.1:${port}, pid ${process.pid}`);
});
