// Closed-loop load generator for the Restate saga (services.js), the counterpart of
// `sagactl load`: keeps --in-flight orders open, each a request to Restate's ingress that waits
// for the saga's result; latency is from sending the request to receiving the result.
//
//   node load.js --orders 300 --in-flight 1 --failure-percent 30 --warmup-secs 5 \
//     [--process NAME=PID ...] [--json out.json] [--ingress http://127.0.0.1:8080] \
//     [--admin http://127.0.0.1:9070]
//
// With --admin, it then counts the participants' records by status through Restate's SQL
// introspection and checks them against the sagas' results (for a fresh Restate only).
"use strict";
const http = require("node:http");
const fs = require("node:fs");
const { randomUUID } = require("node:crypto");
const { parseArgs } = require("node:util");

const { values: opts } = parseArgs({
  options: {
    orders: { type: "string", default: "100" },
    "in-flight": { type: "string", default: "1" },
    "failure-percent": { type: "string", default: "0" },
    "warmup-secs": { type: "string", default: "5" },
    "timeout-secs": { type: "string", default: "60" },
    ingress: { type: "string", default: "http://127.0.0.1:8080" },
    admin: { type: "string" },
    process: { type: "string", multiple: true, default: [] },
    json: { type: "string" },
  },
});
const orders = Number(opts.orders);
const inFlight = Number(opts["in-flight"]);
const failurePercent = Number(opts["failure-percent"]);
const warmupSecs = Number(opts["warmup-secs"]);
const timeoutMs = Number(opts["timeout-secs"]) * 1000;
if (!(orders >= 1 && inFlight >= 1)) throw new Error("--orders and --in-flight must be at least 1");
if (!(failurePercent >= 0 && failurePercent <= 100)) throw new Error("--failure-percent is a percentage");
const processes = opts.process.map((spec) => {
  const [name, pid] = spec.split("=");
  if (!name || !(Number(pid) > 0)) throw new Error(`--process wants NAME=PID, got ${spec}`);
  return { name, pid: Number(pid) };
});

// The same orders as sagactl's random_order: one item from the demo data; failurePercent of
// them are refused at a step, in equal parts: unknown stock (nothing to compensate), a
// declined payment (release the stock), a denied destination (refund, then release).
function randomOrder() {
  let [customerId, sku, country] = Math.random() < 0.5 ? ["alice", "WIDGET", "DE"] : ["bob", "GADGET", "FR"];
  if (Math.random() * 100 < failurePercent) {
    [customerId, sku, country] = [
      ["alice", "SOLDOUT", "DE"],
      ["carol", "WIDGET", "DE"],
      ["bob", "GADGET", "AQ"],
    ][Math.floor(Math.random() * 3)];
  }
  return {
    customerId,
    items: [{ sku, quantity: 1, unitPriceCents: 1000 }],
    totalCents: 1000,
    currency: "EUR",
    shippingAddress: { country, city: "Berlin", line1: "Unter den Linden 1", postalCode: "10117" },
  };
}

// Keep-alive connections, one per order in flight, so no request waits for a handshake.
const agent = new http.Agent({ keepAlive: true, maxSockets: inFlight });
const ingress = new URL(opts.ingress);

// Places one order: POST /order/<order id>/run answers with the workflow's result.
function placeOrder(orderId, order) {
  const body = JSON.stringify(order);
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        agent,
        hostname: ingress.hostname,
        port: ingress.port,
        path: `/order/${orderId}/run`,
        method: "POST",
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) },
        timeout: timeoutMs,
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (chunk) => (text += chunk));
        res.on("end", () =>
          res.statusCode === 200 ? resolve(JSON.parse(text)) : reject(new Error(`HTTP ${res.statusCode}: ${text}`))
        );
      }
    );
    req.on("timeout", () => req.destroy(new Error(`no result after ${timeoutMs} ms`)));
    req.on("error", reject);
    req.end(body);
  });
}

// User plus system CPU seconds of pid so far, from /proc/PID/stat (after the command name,
// which may hold spaces, utime and stime are fields 12 and 13). Linux counts in USER_HZ = 100.
function cpuSeconds(pid) {
  try {
    const fields = fs.readFileSync(`/proc/${pid}/stat`, "utf8").split(")").pop().trim().split(/\s+/);
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return NaN;
  }
}

// Peak resident set size of pid (VmHWM) in MB.
function peakRssMb(pid) {
  try {
    const line = fs.readFileSync(`/proc/${pid}/status`, "utf8").split("\n").find((l) => l.startsWith("VmHWM:"));
    return parseInt(line.slice(6), 10) / 1024;
  } catch {
    return NaN;
  }
}

// The q quantile (nearest rank) of sorted latencies in ms, as sagactl computes it.
function percentile(sorted, q) {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(Math.max(Math.ceil(sorted.length * q), 1), sorted.length) - 1];
}

async function main() {
  const tally = { latencies: [], finishedAt: [], completed: 0, compensated: 0, failed: 0, compensations: {}, errors: {} };
  const cpuBefore = processes.map((p) => cpuSeconds(p.pid));
  const started = performance.now();
  let sent = 0;

  const progress = setInterval(
    () => console.error(`sent ${sent}/${orders}, finished ${tally.latencies.length}, failed ${tally.failed}`),
    1000
  );

  // Closed loop: each worker places its next order when the previous one has its result.
  async function worker() {
    while (sent < orders) {
      sent++;
      const sentAt = performance.now();
      try {
        const result = await placeOrder(randomUUID(), randomOrder());
        const now = performance.now();
        if (result.status !== "completed" && result.status !== "compensated") {
          throw new Error(`unexpected result ${JSON.stringify(result)}`);
        }
        tally.latencies.push(now - sentAt);
        tally.finishedAt.push({ at: now, completed: result.status === "completed" });
        if (result.status === "completed") tally.completed++;
        else tally.compensated++;
        for (const name of result.compensations ?? []) {
          const kind = name.split(" ")[0]; // "release WIDGET" counts as "release"
          tally.compensations[kind] = (tally.compensations[kind] ?? 0) + 1;
        }
      } catch (e) {
        // No result (timeout, HTTP error): the saga counts as failed, not finished.
        tally.failed++;
        tally.errors[e.message] = (tally.errors[e.message] ?? 0) + 1;
      }
    }
  }
  await Promise.all(Array.from({ length: inFlight }, worker));
  const elapsedSecs = (performance.now() - started) / 1000;
  clearInterval(progress);
  agent.destroy();

  const ownCpu = process.cpuUsage(); // microseconds, since this process started
  const finished = tally.latencies.length;
  const sorted = [...tally.latencies].sort((a, b) => a - b);
  const report = {
    system: "restate",
    orders,
    finished,
    completed: tally.completed,
    compensated: tally.compensated,
    failed: tally.failed,
    compensations_run: tally.compensations,
    mode: `closed loop, ${inFlight} in flight`,
    failure_percent: failurePercent,
    elapsed_secs: elapsedSecs,
    finished_per_sec: finished / elapsedSecs,
    completed_per_sec: tally.completed / elapsedSecs,
    ...sustained(tally.finishedAt, started, warmupSecs),
    latency_ms: {
      p50: percentile(sorted, 0.5),
      p90: percentile(sorted, 0.9),
      p99: percentile(sorted, 0.99),
      p999: percentile(sorted, 0.999),
      max: percentile(sorted, 1),
    },
    processes: processes.map((p, i) => {
      const cpu = cpuSeconds(p.pid) - cpuBefore[i];
      return { name: p.name, pid: p.pid, cpu_secs: cpu, cpu_ms_per_saga: (cpu * 1000) / Math.max(finished, 1), peak_rss_mb: peakRssMb(p.pid) };
    }),
    load_generator_cpu_secs: (ownCpu.user + ownCpu.system) / 1e6,
    errors: tally.errors,
  };
  if (opts.admin) report.state_check = await checkState(report);
  printReport(report);
  if (opts.json) fs.writeFileSync(opts.json, JSON.stringify(report, null, 2) + "\n");
  process.exitCode = tally.failed > 0 || report.state_check?.matches === false ? 1 : 0;
}

// The participants' records by status, read from Restate's state through its SQL API, and
// whether they agree with the sagas' results: each completed saga left a reservation, a charge
// and a shipment; each compensation a released reservation or a refunded charge.
async function checkState(r) {
  const sql = `SELECT service_name, regexp_replace(value_utf8, '.*"status":"([a-z]+)".*', '\\1') AS status, count(*) AS n
    FROM state WHERE key LIKE 'order:%' OR key = 'shipment' GROUP BY 1, 2`;
  const res = await fetch(new URL("/query", opts.admin), {
    method: "POST",
    headers: { "content-type": "application/json", accept: "application/json" },
    body: JSON.stringify({ query: sql }),
  });
  if (!res.ok) throw new Error(`state query: HTTP ${res.status}: ${await res.text()}`);
  const counts = {};
  for (const row of (await res.json()).rows) counts[`${row.service_name} ${row.status}`] = Number(row.n);
  const expected = {
    "inventory reserved": r.completed,
    "inventory released": r.compensations_run.release ?? 0,
    "payment charged": r.completed,
    "payment refunded": r.compensations_run.refund ?? 0,
    "shipping scheduled": r.completed,
  };
  const matches = Object.entries(expected).every(([k, n]) => (counts[k] ?? 0) === n);
  return { counts, expected, matches };
}

// Finished and completed sagas per second from the end of the warm-up to the last finish; over
// the whole run when it was shorter than twice the warm-up (as sagactl).
function sustained(finishedAt, started, warmupSecs) {
  if (finishedAt.length === 0) return { sustained_finished_per_sec: 0, sustained_completed_per_sec: 0 };
  const last = finishedAt.reduce((max, f) => Math.max(max, f.at), 0);
  const from = started + ((last - started) / 1000 > 2 * warmupSecs ? warmupSecs * 1000 : 0);
  const after = finishedAt.filter((f) => f.at >= from);
  const secs = Math.max((last - from) / 1000, Number.EPSILON);
  return {
    sustained_finished_per_sec: after.length / secs,
    sustained_completed_per_sec: after.filter((f) => f.completed).length / secs,
  };
}

function printReport(r) {
  const f = (x, d = 1) => x.toFixed(d);
  const out = [
    `system            restate`,
    `mode              ${r.mode}, ${r.failure_percent}% built to fail`,
    `orders            ${r.orders} (finished ${r.finished}, failed ${r.failed})`,
    `outcomes          completed ${r.completed}, compensated ${r.compensated}`,
    `compensations run ${Object.entries(r.compensations_run).map(([k, n]) => `${k} ${n}`).join(", ") || "none"}`,
    `elapsed           ${f(r.elapsed_secs, 2)} s`,
    `throughput        ${f(r.finished_per_sec)} finished/s, ${f(r.completed_per_sec)} completed/s`,
    `sustained         ${f(r.sustained_finished_per_sec)} finished/s, ${f(r.sustained_completed_per_sec)} completed/s after warm-up`,
    `latency (ms)      p50 ${f(r.latency_ms.p50)}  p90 ${f(r.latency_ms.p90)}  p99 ${f(r.latency_ms.p99)}  p99.9 ${f(r.latency_ms.p999)}  max ${f(r.latency_ms.max)}`,
    ...r.processes.map(
      (p) => `process           ${p.name.padEnd(15)} cpu ${f(p.cpu_secs, 2).padStart(7)} s  ${f(p.cpu_ms_per_saga, 2).padStart(6)} ms/saga  peak rss ${f(p.peak_rss_mb).padStart(6)} MB`
    ),
    `load generator    cpu ${f(r.load_generator_cpu_secs, 2)} s`,
    ...(r.state_check
      ? [`state in restate  ${Object.entries(r.state_check.counts).sort().map(([k, n]) => `${k} ${n}`).join(", ")} (${r.state_check.matches ? "matches the results" : "DOES NOT match the results"})`]
      : []),
    ...Object.entries(r.errors).map(([e, n]) => `error             ${n} x ${e}`),
  ];
  console.log(out.join("\n"));
}

main().catch((e) => {
  console.error(e);
  process.exit(2);
});
