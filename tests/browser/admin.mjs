// Drives the mailbridge admin page in Debian's headless Chromium, as an admin
// would: sign in, Connect account (OAuth consent at the fake provider), a
// sample mail that goes out through the alternate server, the alternate-server
// message and "Return to the primary server", a settings change that takes
// effect after Save, and a sample mail that the server refuses.
// Run by tests/admin_browser.rs; exits 0 when every step passed.
import { chromium } from 'playwright-core';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const base = env('MB_URL');
const token = env('MB_TOKEN');
const identity = env('MB_IDENTITY');
const newServer = env('MB_NEW_SERVER');
const userDataDir = env('MB_USER_DATA_DIR');
const screenshot = process.env.MB_SCREENSHOT || '';

let step = 'start';
function check(cond, what) {
  if (!cond) throw new Error(`${step}: ${what}`);
}

async function text(page, selector) {
  return (await page.locator(selector).allInnerTexts()).join('\n');
}

// Submit a form by clicking its button; the response of the page it lands on.
async function submit(page, button) {
  const [resp] = await Promise.all([page.waitForNavigation(), button.click()]);
  return resp;
}

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  viewport: { width: 1100, height: 1400 },
  timeout: 60000,
});
context.setDefaultTimeout(30000);
const page = context.pages()[0] || (await context.newPage());
let code = 0;
try {
  step = 'login form';
  let resp = await page.goto(base + '/');
  check(resp.status() === 200, `GET / answered ${resp.status()}`);
  check(await page.locator('input[name=token][type=password]').count() === 1, 'no token field');

  step = 'wrong token';
  await page.fill('#token', 'not-the-admin-token');
  resp = await submit(page, page.getByRole('button', { name: 'Sign in' }));
  check(resp.status() === 401, `wrong token answered ${resp.status()}`);
  check((await text(page, 'main')).includes('That is not the admin token'), 'no message for a wrong token');

  step = 'sign in';
  await page.fill('#token', token);
  resp = await submit(page, page.getByRole('button', { name: 'Sign in' }));
  check(resp.status() === 200, `after sign-in ${resp.status()}`);
  check(new URL(page.url()).pathname === '/', `landed on ${page.url()}`);
  check(!page.url().includes(token), 'the token is in the URL');
  const cookies = await context.cookies(base);
  const session = cookies.find((c) => c.name === 'mailbridge_session');
  check(session && session.httpOnly && session.sameSite === 'Strict' && session.path === '/', `cookie ${JSON.stringify(cookies.map((c) => ({ ...c, value: '…' })))}`);
  check((await text(page, 'main')).includes('Send a sample mail'), 'no dashboard');

  step = 'connect account';
  const row = page.locator('tr', { has: page.locator('td', { hasText: identity }) });
  check(await row.locator('.oauth-state').getAttribute('data-state') === 'needs_login', 'identity not in needs_login before consent');
  await Promise.all([
    page.waitForURL((u) => u.pathname === '/' && u.origin === new URL(base).origin, { waitUntil: 'load' }),
    row.getByRole('button', { name: 'Connect account' }).click(),
  ]);
  // The callback page sends the browser back here at once.
  await page.waitForSelector('.banner.ok');
  check((await text(page, '.banner.ok')).includes(`Connected ${identity}`), `no success message: ${await text(page, 'main')}`);
  check(await row.locator('.oauth-state').getAttribute('data-state') === 'ok', 'identity not ok after consent');

  step = 'sample mail through the alternate';
  await page.fill('#sample-to', 'ok@example.com');
  await submit(page, page.getByRole('button', { name: 'Send a sample mail' }));
  const sent = await text(page, '.banner.ok');
  check(sent.includes('Sample mail to ok@example.com: sent (delivered via') && sent.includes('alternate route'), `sample: ${await text(page, 'main')}`);

  step = 'alternate-server message';
  const notice = await text(page, '#alternate-notice');
  check(/^Mail is being sent through the alternate server since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, because .+\.$/.test(notice), `notice: ${notice}`);
  check(!/\b1\d{9}\b/.test(await text(page, 'main')), 'an epoch number on the page');
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });

  step = 'return to the primary server';
  await submit(page, page.getByRole('button', { name: 'Return to the primary server' }));
  check((await text(page, '.banner.ok')).includes('Mail goes through the primary server again'), `failback: ${await text(page, 'main')}`);
  check(await page.locator('#alternate-notice').count() === 0, 'still on the alternate');

  step = 'settings: a refused value';
  await page.locator('header').getByRole('link', { name: 'Settings', exact: true }).click();
  await page.waitForSelector('#settings');
  check(await page.inputValue('#f-oauth-client_secret') === '', 'the client secret was sent to the browser');
  check(await page.locator('#f-connect_url').isHidden(), 'EWS field shown for SMTP');
  await page.selectOption('#f-protocol', 'ews');
  check(await page.locator('#f-connect_url').isVisible(), 'EWS field hidden for EWS');
  check(await page.locator('#f-server').isHidden(), 'SMTP field shown for EWS');
  await page.selectOption('#f-protocol', 'smtp');
  await page.fill('#f-server', '');
  resp = await submit(page, page.getByRole('button', { name: 'Save' }));
  check(resp.status() === 400, `empty server answered ${resp.status()}`);
  check((await text(page, '#settings-error')).includes('upstream.server'), `error: ${await text(page, 'main')}`);

  step = 'settings: save';
  await page.fill('#f-server', newServer);
  await page.fill('#f-sender_name', 'Help Desk');
  await submit(page, page.getByRole('button', { name: 'Save' }));
  check((await text(page, '.banner.ok')).includes('Settings saved and applied.'), `save: ${await text(page, 'main')}`);
  check(await page.inputValue('#f-server') === newServer, 'the new server is not shown');
  if (screenshot) await page.screenshot({ path: screenshot.replace(/\.png$/, '') + '-settings.png', fullPage: true });

  step = 'sample mail through the new server';
  await page.locator('header').getByRole('link', { name: 'Dashboard', exact: true }).click();
  await page.fill('#sample-to', 'ok2@example.com');
  await submit(page, page.getByRole('button', { name: 'Send a sample mail' }));
  const viaNew = await text(page, '.banner.ok');
  check(viaNew.includes(newServer) && viaNew.includes('primary route'), `sample after save: ${await text(page, 'main')}`);

  step = 'sample mail refused';
  await page.fill('#sample-to', 'fail@example.com');
  await submit(page, page.getByRole('button', { name: 'Send a sample mail' }));
  const refused = await text(page, '.banner.err');
  check(refused.includes('not sent. The server answered:') && refused.includes('550 5.1.1 <fail@example.com>: Recipient address rejected'), `refused: ${await text(page, 'main')}`);
  check((await text(page, '#queue-count')).startsWith('0 messages waiting'), `queue: ${await text(page, '#queue-count')}`);

  step = 'queue page';
  await page.locator('header').getByRole('link', { name: 'Queue', exact: true }).click();
  check((await text(page, '#queue-count')).startsWith('0 messages in the queue'), `queue page: ${await text(page, 'main')}`);
  console.log('admin page: all steps passed');
} catch (e) {
  console.error(`FAILED at ${step}: ${e.message}`);
  try {
    console.error(`page ${page.url()}:\n${(await text(page, 'body')).slice(0, 4000)}`);
  } catch {}
  code = 1;
} finally {
  await context.close();
}
process.exit(code);
