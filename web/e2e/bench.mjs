// bench/run.sh web: the console in headless Chromium against a lab pool. bench/web.sh
// starts the lab and runs this with CONSOLE_URL, CONSOLE_CERT, CONSOLE_PASSWORD_FILE,
// LAB_GUEST (the test guest's kernel on the hosts) and NODE_EXTRA_CA_CERTS (the lab's CA,
// for this script's own calls). Figures:
//   inventory_1k_ms, inventory_10k_ms  navigation until the page has every VM and its
//                                      feed is live (median of 5 loads)
//   update_p50_ms, update_p99_ms       from sending a change (a VM renamed) until the page
//                                      shows it (100 changes, 1,000 VMs)
//   heap_growth_ratio                  JS heap after HEAP_MINUTES of changes over the heap
//                                      before them (each after a full GC)
import { readFileSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { PoolService } from "./gen/pool_pb.js";
import { launch, logIn, need } from "./browser.mjs";

const url = need("CONSOLE_URL");
const password = readFileSync(need("CONSOLE_PASSWORD_FILE"), "utf8").trim();
const guest = need("LAB_GUEST");
const heapMinutes = Number(process.env.HEAP_MINUTES ?? "10");
const CHANGES = 100;
const LOADS = 5;
// The sizes; smaller ones only to try the script out.
const [SMALL, LARGE] = (process.env.BENCH_VMS ?? "1000 10000").split(" ").map(Number);

let token = "";
const client = createClient(
  PoolService,
  createGrpcWebTransport({
    baseUrl: url.replace(/\/$/, ""),
    interceptors: [(next) => (req) => (req.header.set("authorization", `Bearer ${token}`), next(req))],
  }),
);
token = (await client.login({ userName: "admin", password })).token;

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.ceil((p / 100) * xs.length) - 1)];
const log = (s) => console.error(s);

/** Stopped VMs of the test guest, no disks, `bench-N` up to `total`, 32 calls at a time. */
async function vmsUpTo(total) {
  const have = (await client.getPool({})).vmCount;
  let next = have;
  const began = Date.now();
  const worker = async () => {
    for (let i = next++; i < total; i = next++) {
      await client.createVm({
        requestId: randomUUID(),
        spec: { name: `bench-${i}`, vcpus: 1, memoryBytes: 16n << 20n, boot: { kernelPath: guest } },
        source: { case: "fromDisks", value: true },
      });
    }
  };
  await Promise.all(Array.from({ length: 32 }, worker));
  log(`${total - have} VMs created in ${((Date.now() - began) / 1000).toFixed(1)} s`);
}

/** Navigation until the tree has `n` VMs and the feed is live, by the page's own clock. */
async function inventoryMs(page, n) {
  const runs = [];
  for (let i = 0; i < LOADS; i++) {
    await page.reload({ waitUntil: "commit" });
    const ms = await page.evaluate(
      (n) =>
        new Promise((done) => {
          const check = () => {
            const tree = document.querySelector("nav.tree");
            if (tree?.getAttribute("data-vm-count") === String(n) && document.querySelector("[data-status=live]")) {
              done(performance.now());
            } else {
              requestAnimationFrame(check);
            }
          };
          check();
        }),
      n,
    );
    runs.push(ms);
  }
  log(`inventory of ${n} VMs: ${runs.map((r) => r.toFixed(0)).join(", ")} ms`);
  return median(runs);
}

/** The VM shown in the panel is renamed `CHANGES` times; each, until its panel shows it. */
async function updateLatencies(page, vm) {
  await page.fill("input.search", vm.spec.name);
  await page.locator(".found a[data-kind=vm]", { hasText: vm.spec.name }).first().click();
  await page.fill("input.search", "");
  await page.locator("[data-panel=vm] h2", { hasText: vm.spec.name }).waitFor();
  const out = [];
  for (let k = 0; k < CHANGES; k++) {
    const name = `${vm.spec.name.split(".")[0]}.r${k}`;
    await page.evaluate((name) => {
      window.__shown = new Promise((done) => {
        const seen = () => document.querySelector("[data-panel=vm] h2")?.textContent?.includes(name);
        const obs = new MutationObserver(() => {
          if (seen()) {
            obs.disconnect();
            requestAnimationFrame(() => done(Date.now()));
          }
        });
        obs.observe(document.body, { subtree: true, childList: true, characterData: true });
      });
    }, name);
    const sent = Date.now();
    await client.updateVm({ requestId: randomUUID(), vmId: vm.id, spec: { ...vm.spec, name } });
    const shown = await page.evaluate(() => window.__shown);
    out.push(shown - sent);
  }
  return out;
}

async function heapBytes(cdp) {
  await cdp.send("HeapProfiler.collectGarbage");
  return (await cdp.send("Runtime.getHeapUsage")).usedSize;
}

const { page, context, close } = await launch(need("CONSOLE_CERT"));
try {
  page.setDefaultTimeout(120_000);
  await vmsUpTo(SMALL);
  await logIn(page, url, "admin", password);
  const inv1k = await inventoryMs(page, SMALL);

  const vms = (await client.listVms({ page: { pageSize: 10 } })).vms;
  const lat = await updateLatencies(page, vms[0]);
  log(`update latency over ${CHANGES}: p50 ${median(lat)} ms, p99 ${pct(lat, 99)} ms, max ${Math.max(...lat)} ms`);

  // The heap, before and after minutes of changes to many VMs at ~10 a second.
  const cdp = await context.newCDPSession(page);
  const before = await heapBytes(cdp);
  const until = Date.now() + heapMinutes * 60_000;
  const all = (await client.listVms({ page: { pageSize: SMALL } })).vms;
  let changes = 0;
  let nextLog = Date.now() + 60_000;
  while (Date.now() < until) {
    if (Date.now() >= nextLog) {
      log(`heap ${((await heapBytes(cdp)) / 1e6).toFixed(1)} MB after ${changes} changes`);
      nextLog += 60_000;
    }
    const vm = all[changes % all.length];
    const spec = { ...vm.spec, labels: { ...vm.spec.labels, bench: String(changes) } };
    await client.updateVm({ requestId: randomUUID(), vmId: vm.id, spec });
    changes++;
    await new Promise((r) => setTimeout(r, 100));
  }
  const after = await heapBytes(cdp);
  log(`heap ${(before / 1e6).toFixed(1)} MB before, ${(after / 1e6).toFixed(1)} MB after ${changes} changes in ${heapMinutes} min`);

  await vmsUpTo(LARGE);
  const inv10k = await inventoryMs(page, LARGE);

  console.log(`BENCH web_inventory_1k_ms ${inv1k.toFixed(0)} ms`);
  console.log(`BENCH web_inventory_10k_ms ${inv10k.toFixed(0)} ms`);
  console.log(`BENCH web_update_p50_ms ${median(lat)} ms`);
  console.log(`BENCH web_update_p99_ms ${pct(lat, 99)} ms`);
  console.log(`BENCH web_heap_growth_ratio ${(after / before).toFixed(3)} ratio`);
} finally {
  await close();
}
