// The dashboard in a real headless Chromium (Debian's, driven by
// playwright-core), against a running `understudy serve` with recorded
// traffic. Run by crates/understudy-cli/tests/dashboard.rs, which starts the
// gateway, makes the keys and writes `report savings --json` to a file.
//
// Env: BASE (http://127.0.0.1:PORT), ADMIN_KEY, VIEWER_KEY, TASK,
// SAVINGS_JSON (a file), N_CALLS and N_FAILED (recorded), PROBE (a prompt
// text one call holds), UNDERSTUDY_PLAYWRIGHT_DIR (holds node_modules),
// EVAL_TASK (a task with an evaluated version) and EVAL_CONFUSION (its
// confusion matrix, flattened, as JSON), SCREENSHOT_DIR (optional: PNGs of
// each page for docs/).
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const require = createRequire(path.join(process.env.UNDERSTUDY_PLAYWRIGHT_DIR, "package.json"));
const { chromium } = require("playwright-core");

const base = process.env.BASE;
const task = process.env.TASK;
const savings = JSON.parse(fs.readFileSync(process.env.SAVINGS_JSON, "utf8"));
const nCalls = Number(process.env.N_CALLS);
const nFailed = Number(process.env.N_FAILED);
const shots = process.env.SCREENSHOT_DIR;

function check(condition, message) {
  if (!condition) throw new Error(message);
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"],
});

// A browser session; every console error or page error is a failure, but
// for the refusals a check provokes on purpose (`expected` statuses).
async function session(expected = []) {
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await context.newPage();
  const errors = [];
  const provoked = (text) => expected.some((status) => text.includes(`status of ${status} `));
  page.on("console", (message) => {
    if (message.type() === "error" && !provoked(message.text())) errors.push(message.text());
  });
  page.on("pageerror", (error) => errors.push(String(error)));
  return { context, page, errors };
}

async function signIn(key, expected = []) {
  const signed = await session(expected);
  await signed.page.goto(`${base}/ui/login`);
  await signed.page.fill("#key", key);
  await Promise.all([signed.page.waitForURL(`${base}/ui`), signed.page.click("button[type=submit]")]);
  return signed;
}

async function shot(page, name) {
  if (shots) await page.screenshot({ path: path.join(shots, `dashboard-${name}.png`), fullPage: true });
}

// The overview's figures are `report savings --json`'s, to the last digit.
async function checkOverview(page) {
  const cells = await page.$$eval("#tasks td[data-figure]", (tds) =>
    tds.map((td) => ({ task: td.closest("tr").dataset.task, figure: td.dataset.figure, value: td.dataset.value })));
  check(cells.length >= 7, `the overview shows the figures: ${JSON.stringify(cells)}`);
  for (const cell of cells) {
    const totals = savings.tasks.find((row) => row.task === cell.task);
    check(totals, `task ${cell.task} is in report savings`);
    let expected = totals[cell.figure];
    if (expected && typeof expected === "object") expected = expected.value;
    if (expected === null || expected === undefined) {
      check(cell.value === "", `${cell.figure}: page ${cell.value}, report none`);
      continue;
    }
    const shown = Number(cell.value);
    check(Math.abs(shown - expected) <= 1e-9 * Math.max(1, Math.abs(expected)),
      `${cell.task} ${cell.figure}: the page says ${cell.value}, report savings ${expected}`);
  }
  check(await page.$("#money-chart .uplot"), "the money chart is drawn");
  check(await page.$("#quality-chart .uplot"), "the quality chart is drawn");
}

async function healthPolicy() {
  const response = await fetch(`${base}/healthz`, { headers: { authorization: `Bearer ${process.env.ADMIN_KEY}` } });
  return (await response.json()).tasks[task].policy;
}

// The gateway picks a promotion up on its next poll of the store.
async function waitForPolicy(wanted) {
  let policy = "";
  for (let attempt = 0; attempt < 200; attempt++) {
    policy = await healthPolicy();
    if (wanted(policy)) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`/healthz never showed the route asked for; it shows ${policy}`);
}

try {
  // Not signed in: the login page. A wrong key: refused, said so.
  {
    const anon = await session([401]);
    await anon.page.goto(`${base}/ui`);
    check(anon.page.url() === `${base}/ui/login`, `not signed in leads to the login page, not ${anon.page.url()}`);
    await anon.page.fill("#key", "us-not-a-key");
    const [response] = await Promise.all([anon.page.waitForResponse(`${base}/ui/login`), anon.page.click("button[type=submit]")]);
    check(response.status() === 401, `a wrong key gets 401, not ${response.status()}`);
    check((await anon.page.textContent("#login-error")).includes("us-not-a"), "the error names the key it refused");
    await shot(anon.page, "login");
    await anon.context.close();
  }

  // A key without the admin role: the overview and the task, read-only.
  {
    // Its refusals (403) are provoked below.
    const viewer = await signIn(process.env.VIEWER_KEY, [403]);
    await checkOverview(viewer.page);
    check(!(await viewer.page.$("a[href='/ui/calls']")), "no Calls link for a non-admin");
    const calls = await viewer.page.goto(`${base}/ui/calls`);
    check(calls.status() === 403, `the call list is refused to a non-admin: ${calls.status()}`);
    await viewer.page.goto(`${base}/ui/tasks/${task}`);
    check(!(await viewer.page.$("#promote-shadow")), "no buttons for a non-admin");
    const status = await viewer.page.evaluate(async (url) => {
      const response = await fetch(url, { method: "POST", headers: { "content-type": "application/x-www-form-urlencoded" }, body: "policy=lead" });
      return response.status;
    }, `${base}/ui/tasks/${task}/promote`);
    check(status === 403, `a non-admin cannot promote: ${status}`);
    check(viewer.errors.length === 0, `console errors: ${viewer.errors.join("; ")}`);
    await viewer.context.close();
  }

  // An admin: everything, and the buttons.
  // An uncertified cascade is refused (409) on purpose below.
  const admin = await signIn(process.env.ADMIN_KEY, [409]);
  const page = admin.page;
  await checkOverview(page);
  await shot(page, "overview");

  await page.goto(`${base}/ui/calls`);
  check(Number(await page.textContent("#n-calls")) === nCalls, `all ${nCalls} calls listed`);
  check((await page.$$("#calls tbody tr[data-call]")).length === Math.min(50, nCalls), "a page of calls");
  await shot(page, "calls");
  await page.selectOption("select[name=status]", "error");
  await Promise.all([page.waitForURL(/status=error/), page.click("#apply")]);
  check(Number(await page.textContent("#n-calls")) === nFailed, `the status filter narrows to ${nFailed}`);
  await page.goto(`${base}/ui/calls`);
  await page.fill("input[name=q]", process.env.PROBE);
  await Promise.all([page.waitForURL(/q=/), page.click("#apply")]);
  check(Number(await page.textContent("#n-calls")) === 1, "the text search finds the one call");
  const exported = await page.evaluate(async () => (await fetch(document.querySelector("#export").href)).text());
  check(exported.trim().split("\n").length === 1 && exported.includes(process.env.PROBE), `export: ${exported}`);
  await Promise.all([page.waitForURL(/\/ui\/calls\/[0-9a-f-]+$/), page.click("#calls tbody tr a")]);
  check((await page.textContent("#request")).includes(process.env.PROBE), "the call's request");
  await shot(page, "call");

  await page.goto(`${base}/ui/keys`);
  check((await page.$$("#keys tbody tr[data-key]")).length === 2, "both keys listed");
  await shot(page, "keys");

  // A promotion from the task page reaches the gateway's route.
  await page.goto(`${base}/ui/tasks/${task}`);
  check((await page.textContent("#policy")).trim() === "lead", "the lead serves at first");
  await Promise.all([page.waitForURL(/done=/), page.click("#promote-shadow")]);
  check((await page.textContent("#done")).includes("shadow"), "the page says what changed");
  await waitForPolicy((policy) => policy.startsWith("shadow"));
  // A cascade needs a certified threshold: refused, and said why.
  const [refused] = await Promise.all([page.waitForResponse(`${base}/ui/tasks/${task}/promote`), page.click("#promote-cascade")]);
  check(refused.status() === 409, `an uncertified cascade is refused: ${refused.status()}`);
  await page.goto(`${base}/ui/tasks/${task}`);
  check((await page.textContent("#history")).includes("dashboard: by ops"), "the history says who promoted");
  // Lead only, then roll back to the shadow before it.
  await Promise.all([page.waitForURL(/done=/), page.click("#promote-lead")]);
  await waitForPolicy((policy) => policy === "lead");
  await Promise.all([page.waitForURL(/done=/), page.click("#roll-back")]);
  await waitForPolicy((policy) => policy.startsWith("shadow"));
  await shot(page, "task");

  // A model version's eval: the confusion matrix and the coverage curve of
  // its calibration file, and the drift watch's section.
  await page.goto(`${base}/ui/tasks/${process.env.EVAL_TASK}`);
  const cells = await page.$$eval("section.eval table.confusion tbody td", (tds) => tds.map((td) => Number(td.textContent)));
  check(JSON.stringify(cells) === process.env.EVAL_CONFUSION, `the confusion matrix: ${JSON.stringify(cells)}`);
  check(await page.$("section.eval div.curve canvas"), "the coverage–agreement curve is drawn");
  check((await page.textContent("section.eval")).includes("0.75"), "the certified threshold");
  check(await page.$("#drift"), "the drift section");
  await shot(page, "task-eval");
  check(admin.errors.length === 0, `console errors: ${admin.errors.join("; ")}`);
  console.log("dashboard: every check passed");
} finally {
  await browser.close();
}
