// The fan's page: activities, the countdown, the grab, my tickets.
//
// Plain DOM, no framework, no inline script (the CSP forbids it), nothing
// fetched from elsewhere. Everything shown that came from the server or a
// user goes in as text (textContent), never as HTML.
'use strict';

const POW_WORKER = '{{pow.js}}';

// ---------------------------------------------------------------- words
const WORDS = {
  en: {
    brand: 'ticketd', mine: 'My tickets', login: 'Log in', logout: 'Log out', register: 'Register',
    activities: 'On sale', none: 'Nothing on sale right now.', loading: 'Loading…',
    open: 'Open', upcoming: 'Opens soon', soldout: 'Sold out', ended: 'Ended', paused: 'Paused', closed: 'Closed',
    opensIn: 'Opens in', closesIn: 'Closes in', remaining: 'Left', total: 'Total', ticket: 'Ticket',
    anyTicket: 'Any ticket type', grab: 'Grab a ticket', grabbing: 'Grabbing…', wait: 'Opens at',
    limit: 'Per person', accountsBefore: 'Open to accounts made before', loginToGrab: 'Log in to grab a ticket', back: '← All activities',
    username: 'Username', password: 'Password', nickname: 'Nickname (optional)',
    haveAccount: 'Have an account? Log in', noAccount: 'New here? Register',
    success: 'Got it! Your code:', seeMine: 'See my tickets', yourCodes: 'Your codes:',
    noTickets: 'You have no tickets yet.', claimedAt: 'Claimed',
    partialList: 'Some tickets of past sales could not be loaded just now. Reload the page in a moment.', pow: 'Solving the anti-bot puzzle…',
    retrying: 'Retrying in', seconds: 's', held: 'You hold',
    gaveUp: 'Press the button to try again (a new try never gets you a second ticket).',
    reload: 'Reload the page to try again.', tryAgainIn: 'Try again in',
    typeSoldOut: 'This ticket type is sold out; another may have tickets left.',
    gotEarlier: 'An earlier try of yours got a ticket.',
    logoutFailed: 'Logging out may not have gone through; press Log out again.',
    queue: 'Waiting room', lottery: 'Lottery', joinQueue: 'Join the waiting room', enterLottery: 'Enter the draw',
    queueOpensIn: 'The waiting room opens in', joined: 'You are in.',
    drawNote: 'Everyone who joins before the draw gets a random place: joining early gives no advantage.',
    lateNote: 'The draw is over: joining now takes a place at the back, first come, first served.',
    position: 'Your place', ahead: 'ahead of you', eta: 'Estimated wait', yourTurn: 'Your turn! Grab before',
    turnTitle: 'Your turn!', passLeft: 'Time left to grab',
    passedOver: 'Your turn ended without a claim; join again to queue at the back.',
    passedOverDrawn: 'Your turn ended without a claim; the draw is over, so there is no new entry.',
    passedOverLast: 'Your turn ended without a claim, and this account has joined this waiting room as many times as it may.',
    standby: 'Every ticket left is held for fans whose turn came; you move up if they do not claim.',
    notDrawn: 'The draw did not pick you this time: you are on the waiting list. Stay on this page: you get a turn if a winner is not here at the start or does not claim.',
    entriesClosed: 'The draw has been made; entries are closed.', done: 'Your turn is over.',
    commitment: 'Draw commitment (SHA-256 of the seed)', seed: 'Revealed seed',
    sep: ': ', days: 'd', drawAt: 'Draw at', endedAt: 'Ended at',
  },
  zh: {
    brand: '抢票', mine: '我的票', login: '登录', logout: '退出', register: '注册',
    activities: '正在售票', none: '暂无活动。', loading: '加载中…',
    open: '进行中', upcoming: '即将开始', soldout: '已抢完', ended: '已结束', paused: '已暂停', closed: '已截止',
    opensIn: '距开抢', closesIn: '距结束', remaining: '剩余', total: '总数', ticket: '票种',
    anyTicket: '任意票种', grab: '立即抢票', grabbing: '抢票中…', wait: '开抢时间',
    limit: '每人限', accountsBefore: '仅限此时间前注册的账号：', loginToGrab: '登录后抢票', back: '← 全部活动',
    username: '用户名', password: '密码', nickname: '昵称（可选）',
    haveAccount: '已有账号？登录', noAccount: '没有账号？注册',
    success: '抢到了！你的券码：', seeMine: '查看我的票', yourCodes: '你的券码：',
    noTickets: '你还没有票。', claimedAt: '领取时间',
    partialList: '部分往期活动的票暂时无法加载，请稍后刷新页面。', pow: '正在完成防机器人验证…',
    retrying: '重试倒计时', seconds: '秒', held: '你已持有',
    gaveUp: '请再按一次按钮重试（再试不会让你多得一张票）。',
    reload: '请刷新页面重试。', tryAgainIn: '请稍后再试：',
    typeSoldOut: '这个票种已抢完，其他票种可能还有。',
    gotEarlier: '你之前的一次尝试已抢到票。',
    logoutFailed: '退出可能未成功，请再按一次“退出”。',
    queue: '排队', lottery: '抽签', joinQueue: '进入排队', enterLottery: '参加抽签',
    queueOpensIn: '距开放排队', joined: '你已加入。',
    drawNote: '抽签前加入的人随机排序：早加入没有优势。',
    lateNote: '抽签已结束：现在加入排在队尾，先到先得。',
    position: '你的位置', ahead: '人在你前面', eta: '预计等待', yourTurn: '轮到你了！请在此之前抢票：',
    turnTitle: '轮到你了！', passLeft: '剩余抢票时间',
    passedOver: '你的轮次已结束且未抢票，可重新加入，排到队尾。',
    passedOverDrawn: '你的轮次已结束且未抢票；抽签已结束，不能再报名。',
    passedOverLast: '你的轮次已结束且未抢票；此账号加入本排队的次数已达上限。',
    standby: '剩余的票都已留给轮到的人；若他们不领，你会往前排。',
    notDrawn: '这次抽签没有抽中你：你在候补名单上。请留在此页：若中签者开售时不在或不领，就会轮到你。',
    entriesClosed: '已开奖，报名已截止。', done: '你的轮次已结束。',
    commitment: '抽签承诺（种子的 SHA-256）', seed: '公开的种子',
    sep: '：', days: '天', drawAt: '抽签时间', endedAt: '结束时间',
  },
};

// A sentence for every error code the API answers (README's table).
const ERRORS = {
  en: {
    UNAUTHORIZED: 'Please log in again.', TOKEN_EXPIRED: 'Your session expired; please log in again.',
    CLAIM_TOKEN_REQUIRED: 'The page lost its place in the sale; try again.',
    CLAIM_TOKEN_INVALID: 'The page lost its place in the sale; try again.',
    CLAIM_TOKEN_EXPIRED: 'That took too long; try again.',
    POW_REQUIRED: 'The anti-bot puzzle was not solved; try again.',
    BLOCKED: 'This account or network is blocked from this sale.',
    ACCOUNT_TOO_NEW: 'This sale is open to accounts made before a date, and yours is newer.',
    SESSION_OUTDATED: 'Please log in again to take part in this sale.',
    RATE_LIMITED: 'Too many tries; slow down a little.',
    ACTIVITY_NOT_FOUND: 'This activity does not exist (any more).',
    TICKET_NOT_FOUND: 'This ticket type does not exist in this activity.',
    NOT_STARTED: 'The sale has not started yet.', ENDED: 'The sale has ended.',
    // The page's own: a lottery that has reached everyone it drew.
    CLOSED: 'Everyone drawn has had their turn; nobody more can claim.',
    PAUSED: 'The organiser paused the sale; stay on this page.',
    LIMIT_REACHED: 'You already hold as many tickets as one person may.',
    IN_PROGRESS: 'Your previous try is still being processed.',
    SOLD_OUT: 'Sold out — every ticket has been claimed.',
    STOCK_IN_FLIGHT: 'The last tickets are still being handed out; some may come back.',
    NOT_IMPORTED: 'The tickets are not in yet.',
    OVERLOADED: 'The sale is very busy.', BACKLOG_FULL: 'The sale is very busy.',
    UNAVAILABLE: 'The sale is not answering right now.',
    OUTCOME_UNKNOWN: 'The sale stumbled while storing your ticket; checking whether you got it.',
    STORE_UNAVAILABLE: 'The sale is having trouble.',
    BAD_CREDENTIALS: 'Wrong username or password.', USERNAME_TAKEN: 'This username, or one that looks like it, is taken.',
    INVALID_FIELD: 'Please check the form:', REGISTRATION_CLOSED: 'Registration is closed for this sale.',
    LOGIN_LOCKED: 'Too many failed logins; wait a while.',
    LOGIN_THROTTLED: 'Busy checking logins.', BUSY: 'Busy.',
    CROSS_SITE: 'This request came from another site and was refused.',
    QUEUE_PASS_REQUIRED: 'Wait for your turn in the waiting room first.',
    QUEUE_PASS_EXPIRED: 'Your turn expired before this claim.',
    QUEUE_NOT_OPEN: 'The waiting room is not open yet.', ENTRIES_CLOSED: 'Entries are closed.',
    QUEUE_FULL: 'The waiting room is full.',
    ENTRIES_FULL: 'The lottery has taken all the entries it holds.',
    NO_MORE_PLACES: 'This account has joined this waiting room as many times as it may.',
    INTERNAL: 'The sale had a problem on its side.', REQUEST_TIMEOUT: 'The request took too long to arrive.',
    BAD_BODY: 'The request broke off on the way.', CLAIM_NOT_FOUND: 'No such ticket.',
    TOO_MANY_STREAMS: 'This account follows the waiting room in too many tabs.',
    STREAMS_FULL: 'The waiting room is busy; your place is kept.',
    BAD_REQUEST: 'The request was malformed.', FORBIDDEN: 'This request was refused.',
    BODY_TOO_LARGE: 'The request was too large.', HEADERS_TOO_LARGE: 'The request was too large.',
    URI_TOO_LONG: 'The address is too long.', METHOD_NOT_ALLOWED: 'This request is not allowed here.',
    ROUTE_NOT_FOUND: 'No such page.', MISSING_PARAMETER: 'The address is missing something.',
    INVALID_PARAMETER: 'The address holds a value that is not allowed.',
    MALFORMED_JSON: 'The request was malformed.', UNSUPPORTED_MEDIA_TYPE: 'The request was malformed.',
    NO_QUEUE: 'This sale has no waiting room.', INVALID_IDEMPOTENCY_KEY: 'The request was malformed.',
    IDEMPOTENCY_KEY_REUSED: 'An earlier try of yours got a ticket.',
    BAD_FORWARDED_FOR: 'The request came through a proxy that garbled it.',
    NETWORK: 'No connection to the sale; check your network.', OTHER: 'Something went wrong:',
  },
  zh: {
    UNAUTHORIZED: '请重新登录。', TOKEN_EXPIRED: '登录已过期，请重新登录。',
    CLAIM_TOKEN_REQUIRED: '页面状态已失效，请重试。', CLAIM_TOKEN_INVALID: '页面状态已失效，请重试。',
    CLAIM_TOKEN_EXPIRED: '操作超时，请重试。', POW_REQUIRED: '防机器人验证未完成，请重试。',
    BLOCKED: '该账号或网络已被禁止参与。', RATE_LIMITED: '操作过于频繁，请稍后。',
    ACCOUNT_TOO_NEW: '本次活动只对在某日期之前注册的账号开放，你的账号注册得更晚。',
    SESSION_OUTDATED: '请重新登录后参与本次活动。',
    ACTIVITY_NOT_FOUND: '活动不存在。', TICKET_NOT_FOUND: '该活动没有这个票种。',
    NOT_STARTED: '活动还没开始。', ENDED: '活动已结束。', PAUSED: '主办方暂停了活动，请留在本页。',
    CLOSED: '所有中签者都已轮过，无法再领取。',
    LIMIT_REACHED: '你已达到每人限购数量。', IN_PROGRESS: '上一次请求仍在处理中。',
    SOLD_OUT: '已抢完，所有票都被领走了。', OVERLOADED: '人太多了。',
    STOCK_IN_FLIGHT: '最后几张票正在发放中，可能还会释放出来。', NOT_IMPORTED: '票还没有上架。',
    BACKLOG_FULL: '人太多了。', STORE_UNAVAILABLE: '系统出现问题。',
    UNAVAILABLE: '服务暂时无响应。',
    OUTCOME_UNKNOWN: '保存时出现故障，正在确认你是否抢到。',
    BAD_CREDENTIALS: '用户名或密码错误。', USERNAME_TAKEN: '用户名（或与之相似的名字）已被占用。',
    INVALID_FIELD: '请检查填写内容：', REGISTRATION_CLOSED: '本次活动已关闭注册。',
    LOGIN_LOCKED: '登录失败次数过多，请稍后再试。', LOGIN_THROTTLED: '正在处理登录。',
    BUSY: '系统繁忙。', CROSS_SITE: '来自其他网站的请求已被拒绝。',
    QUEUE_PASS_REQUIRED: '请先在排队中等到你的轮次。', QUEUE_PASS_EXPIRED: '你的轮次在这次抢票前已过期。',
    QUEUE_NOT_OPEN: '排队尚未开放。', ENTRIES_CLOSED: '报名已截止。', QUEUE_FULL: '排队人数已满。',
    ENTRIES_FULL: '抽签报名人数已满。',
    NO_MORE_PLACES: '此账号加入本排队的次数已达上限。',
    INTERNAL: '系统内部出错。', REQUEST_TIMEOUT: '请求传送超时。', BAD_BODY: '请求在传送中断开。',
    CLAIM_NOT_FOUND: '没有这张票。', TOO_MANY_STREAMS: '此账号在太多标签页中关注排队。',
    STREAMS_FULL: '排队系统繁忙，你的位置已保留。',
    BAD_REQUEST: '请求格式有误。', FORBIDDEN: '请求被拒绝。',
    BODY_TOO_LARGE: '请求过大。', HEADERS_TOO_LARGE: '请求过大。',
    URI_TOO_LONG: '网址过长。', METHOD_NOT_ALLOWED: '此处不允许这种请求。',
    ROUTE_NOT_FOUND: '页面不存在。', MISSING_PARAMETER: '网址缺少必要的内容。',
    INVALID_PARAMETER: '网址中的某个值无效。',
    MALFORMED_JSON: '请求格式有误。', UNSUPPORTED_MEDIA_TYPE: '请求格式有误。',
    NO_QUEUE: '本次活动没有排队。', INVALID_IDEMPOTENCY_KEY: '请求格式有误。',
    IDEMPOTENCY_KEY_REUSED: '你之前的一次尝试已抢到票。',
    BAD_FORWARDED_FOR: '请求经过的代理把它弄乱了。',
    NETWORK: '无法连接，请检查网络。', OTHER: '出错了：',
  },
};

/** The rules a field broke, in the page's language: the server says them
 * in English (INVALID_FIELD's message names the field first), and a
 * Chinese page showed "请检查填写内容： username must be 3-32 letters…". */
const FIELD_RULES = {
  zh: {
    username: '用户名须为 3–32 个字母、数字或 _ - . @，同一种文字，且不含不可见字符。',
    password: '密码须为 8–128 个字符。',
    nickname: '昵称最多 32 个字符，且不含控制或不可见字符。',
  },
};

/** Codes after which trying again (as the server says) may succeed. NETWORK
 * (a timeout too), UNAVAILABLE (Nginx's own 502/503/504), INTERNAL (the
 * node's own 500) and OTHER (a 5xx that was not ours) leave a claim's
 * outcome unknown: it is retried with the same Idempotency-Key, which
 * returns the code if the first try took one. REQUEST_TIMEOUT (408: the
 * body did not arrive in time, a phone's slow upload) was never read. */
const RETRYABLE = new Set(['RATE_LIMITED', 'IN_PROGRESS', 'STOCK_IN_FLIGHT', 'NOT_IMPORTED', 'OVERLOADED',
  'BACKLOG_FULL', 'QUEUE_FULL', 'STORE_UNAVAILABLE', 'OUTCOME_UNKNOWN', 'LOGIN_THROTTLED', 'BUSY', 'UNAVAILABLE',
  'INTERNAL', 'NETWORK', 'REQUEST_TIMEOUT']);
const retryable = (res) => RETRYABLE.has(res.error.code) || (res.error.code === 'OTHER' && res.status >= 500);
const MAX_TRIES = 6;
/** After a ticket is got, the grab button stays off this long: a double
 * tap (200-300 ms apart) claimed two tickets under a limit of two, and the
 * page showed one. */
const GRAB_SETTLE_MS = 1500;
/** A request with no answer by then is given up as NETWORK (and retried as
 * such): a phone's connection that stalls mid-request would otherwise
 * leave the grab button on "Grabbing…" for minutes. */
const REQUEST_TIMEOUT_MS = 20000;
/** An event stream silent this long is taken for dead and opened again:
 * the server writes at least every 15 s, and a connection dropped without
 * a word (a phone changing networks) would otherwise hold the fan's place
 * on a stream that never says "your turn". */
const STREAM_SILENCE_MS = 35000;
/** Codes that end the session: the page forgets the token and asks to log in. */
const RELOGIN = ['UNAUTHORIZED', 'TOKEN_EXPIRED', 'SESSION_OUTDATED'];

// ---------------------------------------------------------------- state
const store = {
  get token() { return localStorage.getItem('ticketd.token'); },
  set token(v) { v ? localStorage.setItem('ticketd.token', v) : localStorage.removeItem('ticketd.token'); },
};
let lang = localStorage.getItem('ticketd.lang')
  || ((navigator.languages || [navigator.language]).some((l) => /^zh\b/i.test(l)) ? 'zh' : 'en');
/** Our wall clock minus our steady one. It moves when the device's clock
 * is set (NTP, a carrier's time, waking from sleep), which makes a sample
 * of the server's clock taken before wrong by as much. */
const clockDrift = () => Date.now() - (performance.timeOrigin + performance.now());
/** Server clock minus ours, from the best sample ([`sampleClock`]). */
let clock = { offset: 0, rtt: Infinity, rank: -1, drift: clockDrift() };
let timers = [];
/** Open event streams, closed by each navigation. */
let streams = [];
/** Bumped by each navigation: a view whose fetch returns after the fan moved on draws nothing. */
let navigation = 0;
/** The code of a session found ended by a view, for the view drawn next to say. */
let sessionEnded = null;

const t = (key) => WORDS[lang][key] ?? WORDS.en[key] ?? key;
const serverNow = () => Date.now() + clock.offset;
/** For waits and intervals: a clock the device's clock being set does not move. */
const steadyNow = () => performance.now();
/** The locale dates and numbers are written in: the page's language,
 * in the fan's region. A German browser read the English page with
 * German month names ("7. Dez. 2026"); English of its region ("en-DE")
 * keeps the order of day and month it knows, in the page's words. */
const locale = () => {
  if (lang === 'zh') return 'zh-CN';
  const tags = navigator.languages?.length ? navigator.languages : [navigator.language || 'en'];
  const english = tags.find((l) => /^en\b/i.test(l));
  if (english) return english;
  const region = /^[a-z]{2,3}-([a-z]{2})$/i.exec(tags[0] || '')?.[1];
  return region ? `en-${region.toUpperCase()}` : 'en';
};
const number = (n) => new Intl.NumberFormat(locale()).format(n);
/** A moment, with its time zone: a fan abroad, or a phone set to another
 * zone, read an opening time with no zone as their own. */
const when = (ms) => new Intl.DateTimeFormat(locale(), { dateStyle: 'medium', timeStyle: 'long' }).format(new Date(ms));

// ---------------------------------------------------------------- DOM
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v == null) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const view = () => document.getElementById('view');
function show(...nodes) {
  for (const id of timers) clearInterval(id);
  timers = [];
  for (const s of streams) s.abort();
  streams = [];
  view().replaceChildren(...nodes.filter((n) => n != null && n !== false));
}
function every(ms, fn) { fn(); timers.push(setInterval(fn, ms)); }
function notice(kind, ...content) { return h('div', { class: `notice ${kind}`, role: kind === 'bad' ? 'alert' : 'status' }, ...content); }

// ---------------------------------------------------------------- API
function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** The Idempotency-Key of a grab whose outcome is not known, per activity,
 * kept in sessionStorage until a claim is seen to succeed. A fan who tries
 * again after an answer was lost — once the page gave up, after a reload,
 * back from another page, with another ticket type picked, after a pause —
 * sends the same key, and the server answers a retry of a claim it made
 * with that claim, whatever else changed. Keeping a key longer is always
 * safe (a key without a claim claims); dropping it early is what could
 * hand out a second ticket. (Keys are per account on the server, so
 * another account in this tab cannot collide.) */
const claimKeys = {
  name: (actId) => `ticketd.claimKey.${actId}`,
  pending(actId) { return sessionStorage.getItem(this.name(actId)) !== null; },
  take(actId) {
    const name = this.name(actId);
    let key = sessionStorage.getItem(name);
    if (!key) { key = randomKey(); sessionStorage.setItem(name, key); }
    return key;
  },
  settle(actId) { sessionStorage.removeItem(this.name(actId)); },
};

/** One request; never throws: `{ok, status, data, error, retryAfter}`. */
async function api(method, path, body, extra = {}) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  // The list is the same for everyone (Nginx caches one copy): no token.
  if (store.token && !path.startsWith('/act/list')) headers.Authorization = `Bearer ${store.token}`;
  Object.assign(headers, extra);
  const sent = Date.now();
  const network = { ok: false, status: 0, error: { code: 'NETWORK', message: '' }, retryAfter: 0 };
  const signal = timeoutSignal(REQUEST_TIMEOUT_MS);
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
  } catch {
    return network;
  }
  let json = null;
  try {
    json = await res.json();
  } catch {
    // A body cut off (by the timeout, or a connection lost mid-answer) is
    // no answer; a refusal that is not JSON is handled below.
    if (signal.aborted || res.ok) return network;
  }
  const out = {
    ok: res.ok && json?.ok === true,
    status: res.status,
    data: json?.data,
    error: json?.error || (res.ok ? null : { code: 'OTHER', message: `HTTP ${res.status}` }),
    retryAfter: Number(res.headers.get('Retry-After')) || 0,
  };
  if (json?.data?.serverTime) {
    const cached = ['HIT', 'STALE', 'UPDATING'].includes(res.headers.get('X-Cache'));
    sampleClock(Date.parse(json.data.serverTime), sent, Date.now(), path.startsWith('/act/list'), cached);
  }
  if (out.error && RELOGIN.includes(out.error.code) && store.token) {
    store.token = null;
    renderNav();
  }
  return out;
}

/** An AbortSignal that aborts after `ms` (`AbortSignal.timeout` where the
 * browser has it: not before Safari 16, and the page serves older phones). */
function timeoutSignal(ms) {
  if (typeof AbortSignal.timeout === 'function') return AbortSignal.timeout(ms);
  const c = new AbortController();
  setTimeout(() => c.abort(), ms);
  return c.signal;
}

/** Keeps the best sample of the server's clock: a detail's over a fresh
 * list's over one Nginx answered from its cache (an older serverTime that
 * arrives fastest: it would win on round trip with a time up to a second
 * behind, or minutes while it serves stale), and within a kind the
 * shortest round trip. A cached list still beats the device's own clock.
 * Once the device's clock was set, the kept sample is off by as much and
 * any new one replaces it: kept, it showed the countdown that far off for
 * good (a phone 40 s fast, set right while the page sat open, kept the
 * button shut for the sale's first 40 s). */
function sampleClock(server, sent, received, fromList, cached) {
  const rtt = received - sent;
  // A negative round trip: the device's clock was set while it was out.
  if (!Number.isFinite(server) || rtt < 0) return;
  const rank = fromList ? (cached ? 0 : 1) : 2;
  const drift = clockDrift();
  const set = Math.abs(drift - clock.drift) > 1000;
  if (set || rank > clock.rank || (rank === clock.rank && rtt <= clock.rtt)) {
    clock = { offset: server - (sent + received) / 2, rtt, rank, drift };
  }
}

function errorText(error) {
  const words = ERRORS[lang];
  const known = words[error.code];
  // OTHER (an answer that was no JSON: a proxy's 502 page) keeps its
  // "HTTP 502": "Something went wrong:" alone ended in a colon.
  if (known && error.code !== 'INVALID_FIELD' && error.code !== 'OTHER') return known;
  // "username must …": login's "username or password is too long" is no
  // rule of the username's.
  const field = /^(username|password|nickname) must\b/.exec(error.message || '')?.[1];
  const rule = field && FIELD_RULES[lang]?.[field];
  return `${known || words.OTHER} ${rule || error.message || error.code}`;
}

/** While waiting `ms` to try again: what happened, and when the next try goes. */
function retryingNotice(res, ms) {
  return notice('', `${errorText(res.error)} ${t('retrying')} ${Math.ceil(ms / 1000)}${t('seconds')}`);
}
/** A request given up on: after retries, the fan is asked to try again (the
 * sentences of retryable codes say "retrying", which is no longer true). */
function failedNotice(error, gaveUp, hint = 'gaveUp') {
  return notice('bad', gaveUp ? `${errorText(error)} ${t(hint)}` : errorText(error));
}

/** A GET a view needs: retryable failures are retried as the server says,
 * while the fan stays on the view; `waiting(res, ms)` is told of each wait
 * (a view shows why it is still loading: "Loading…" alone stood for half a
 * minute while a busy node said to come back). */
async function load(path, mine, waiting) {
  for (let tries = 1; ; tries++) {
    const res = await api('GET', path);
    if (res.ok || !retryable(res) || tries === MAX_TRIES || mine !== navigation) return res;
    const ms = retryDelay(res.retryAfter, tries);
    waiting?.(res, ms);
    await sleep(ms);
  }
}
/** A view's `waiting`: still loading, and why. */
const stillLoading = (res, ms) => show(h('p', { class: 'muted' }, t('loading')), retryingNotice(res, ms));
/** The session is gone: say so, with a way back to this page after login. */
function loginPrompt(code) {
  return notice('bad', errorText({ code }), ' ',
    h('a', { href: `#/login?next=${encodeURIComponent(location.hash)}`, id: 'relogin' }, t('login')));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
/** Waits as long as the server asked, plus a random share of a window that
 * doubles with each try ("full jitter"), so thousands of fans told the same
 * Retry-After do not come back together. */
const retryDelay = (seconds, tries = 1) =>
  Math.max(1, seconds) * 1000 + Math.random() * Math.min(8000, 500 * 2 ** tries);

// ---------------------------------------------------------------- views
function statusOf(a, now) {
  if (a.paused) return 'paused';
  if (now >= Date.parse(a.endTime)) return 'ended';
  if (now < Date.parse(a.startTime)) return 'upcoming';
  // Nobody can claim any more, codes left or not (a lottery that has
  // reached every place it drew): not an open sale.
  if (a.closed) return a.remaining > 0 ? 'closed' : 'soldout';
  // A ticket type with no code at all is not sold out: its codes are not
  // in yet (a cluster node before its first count, or nobody imported it).
  return a.remaining > 0 || a.tickets.some((tk) => tk.total === 0) ? 'open' : 'soldout';
}

function countdownText(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
  const two = (n) => String(n).padStart(2, '0');
  return `${d ? `${d}${t('days')} ` : ''}${two(hh)}:${two(mm)}:${two(ss)}`;
}

async function listView() {
  const mine = navigation;
  document.title = `${t('activities')} · ${t('brand')}`;
  show(h('p', { class: 'muted' }, t('loading')));
  const res = await load('/act/list', mine, stillLoading);
  if (mine !== navigation) return;
  if (!res.ok) return show(failedNotice(res.error, retryable(res), 'reload'));
  const acts = res.data.activities;
  // The stock moves: read the list again every 5-10 s while it is shown
  // (it was read once, and a sale sold out showed "Open" with its opening
  // stock). The node renders the list once per change, and Nginx caches it.
  let refreshing = false;
  let nextRefresh = steadyNow() + 5000 + Math.random() * 5000;
  every(1000, () => {
    if (refreshing || document.hidden || steadyNow() < nextRefresh) return;
    refreshing = true;
    nextRefresh = steadyNow() + 5000 + Math.random() * 5000;
    api('GET', '/act/list').then((r) => {
      if (mine !== navigation || !r.ok) return;
      for (const fresh of r.data.activities) {
        const a = acts.find((x) => x.actId === fresh.actId);
        if (a) Object.assign(a, fresh);
      }
    }).finally(() => { refreshing = false; });
  });
  const items = acts.map((a) => {
    const badge = h('span', { class: 'badge' });
    const line = h('p', { class: 'muted' });
    const tick = () => {
      const now = serverNow();
      const st = statusOf(a, now);
      badge.className = `badge ${st}`;
      badge.textContent = t(st);
      line.textContent = st === 'upcoming'
        ? `${t('opensIn')} ${countdownText(Date.parse(a.startTime) - now)}`
        : `${t('remaining')} ${number(a.remaining)} / ${number(a.remaining + a.claimed)}`;
    };
    every(250, tick);
    return h('li', { class: 'card', 'data-act': a.actId },
      h('h2', {}, h('a', { class: 'title', href: `#/act/${encodeURIComponent(a.actId)}`, dir: 'auto' }, a.name)), badge, line);
  });
  const list = items.length ? h('ul', { class: 'cards' }, items) : h('p', { class: 'muted' }, t('none'));
  view().replaceChildren(h('h1', {}, t('activities')), list);
}

async function detailView(actId) {
  const mine = navigation;
  show(h('p', { class: 'muted' }, t('loading')));
  const path = `/act/detail?actId=${encodeURIComponent(actId)}`;
  let res = await load(path, mine, stillLoading);
  // An ended session (api() dropped the token): show the page as to a
  // visitor, whose grab button is a link to log in and come back.
  // Said on the page, with the way to log in (it showed "Log in to grab a
  // ticket" and no word of the session that ended): found by this load, or
  // by the check before the start that drew the page again.
  let ended = sessionEnded;
  sessionEnded = null;
  if (!res.ok && RELOGIN.includes(res.error.code) && !store.token) {
    ended = res.error.code;
    res = await load(path, mine, stillLoading);
  }
  if (mine !== navigation) return;
  if (!res.ok) {
    // The title too: it went on naming the view before (a tab showed
    // "Register" over "no such activity").
    document.title = `${errorText(res.error)} · ${t('brand')}`;
    return show(h('p', {}, h('a', { href: '#/' }, t('back'))), failedNotice(res.error, retryable(res), 'reload'));
  }
  let a = res.data;
  document.title = `${a.name} · ${t('brand')}`;
  // Read each time: a refresh may move them (the organiser's reload).
  const start = () => Date.parse(a.startTime), end = () => Date.parse(a.endTime);
  const badge = h('span', { class: 'badge', id: 'status' });
  const countdown = h('p', { class: 'countdown', id: 'countdown' });
  const caption = h('p', { class: 'muted', id: 'countdown-caption' });
  const opensAt = h('p', { class: 'muted', id: 'opens-at' });
  // When it opens (or ended), when a lottery draws, the limit: a lottery's
  // draw, the moment entries close, was never shown.
  const drawOpensAt = () => {
    const ended = serverNow() >= end();
    const draw = a.admission === 'lottery' && a.queue?.shuffleAt
      ? ` · ${t('drawAt')} ${when(Date.parse(a.queue.shuffleAt))}` : '';
    opensAt.textContent = `${ended ? t('endedAt') : t('wait')} ${when(ended ? end() : start())}${draw}`
      + ` · ${t('limit')} ${number(a.perUserLimit)}`;
  };
  drawOpensAt();
  // Said once per change to a screen reader: the badge and the button
  // change silently otherwise (the countdown is not, ticking every second).
  const said = h('p', { class: 'sr-only', id: 'status-said', 'aria-live': 'polite' });
  let shown = null;
  const cells = new Map();
  const rows = a.tickets.map((tk) => {
    const left = h('td', { class: 'num' }, number(tk.remaining));
    const total = h('td', { class: 'num' }, number(tk.total));
    cells.set(tk.ticketId, { left, total });
    return h('tr', { 'data-ticket': tk.ticketId }, h('td', { dir: 'auto' }, tk.name), left, total);
  });
  const select = h('select', { id: 'ticket', 'aria-label': t('ticket') },
    h('option', { value: '' }, t('anyTicket')),
    a.tickets.map((tk) => h('option', { value: tk.ticketId, dir: 'auto' }, tk.name)));
  const button = h('button', { type: 'button', class: 'primary', id: 'grab', disabled: true }, t('grab'));
  const progress = h('progress', { id: 'pow-progress', max: 1, value: 0, hidden: true, 'aria-label': t('pow') });
  // Live, and focusable: a grab started from the keyboard moves the focus
  // here (the button turns off under it, and the focus fell to the page).
  const result = h('div', { id: 'result', 'aria-live': 'polite', tabindex: '-1' });
  const loggedIn = Boolean(store.token);
  const queued = a.admission && a.admission !== 'race';
  const queue = queued ? { admitted: false, panel: h('div', { class: 'queue', id: 'queue', tabindex: '-1' }) } : null;
  button.addEventListener('click', () => grab(a, select.value, button, progress, result));
  const image = /^https:\/\//.test(a.image) ? h('div', { class: 'hero' }, h('img', { src: a.image, alt: '' })) : null;
  show(
    h('p', {}, h('a', { href: '#/' }, t('back'))),
    // Names and descriptions are the organiser's, in any script: each laid
    // out in its own direction (an Arabic name ending in "!" had it at the
    // wrong end, and its parentheses crossed).
    h('h1', {}, h('bdi', {}, a.name), ' ', badge),
    said,
    image,
    a.desc ? h('p', { dir: 'auto' }, a.desc) : null,
    opensAt,
    a.accountsBefore
      ? h('p', { class: 'muted', id: 'accounts-before' }, `${t('accountsBefore')} ${when(Date.parse(a.accountsBefore))}`)
      : null,
    countdown, caption,
    h('table', {}, h('thead', {}, h('tr', {}, h('th', {}, t('ticket')), h('th', { class: 'num' }, t('remaining')),
      h('th', { class: 'num' }, t('total')))), h('tbody', {}, rows)),
    queue && loggedIn ? queue.panel : null,
    loggedIn
      ? h('div', { class: 'grab' }, a.tickets.length > 1 ? select : null, button, progress)
      : h('p', {}, h('a', { href: `#/login?next=${encodeURIComponent(location.hash)}`, id: 'login-to-grab' }, t('loginToGrab'))),
    result,
  );
  if (a.claims?.length) {
    result.replaceChildren(notice('ok', t('held'), ' ', codesList(a.claims.map((c) => c.code))));
  }
  if (ended && !loggedIn) result.replaceChildren(loginPrompt(ended));
  /** What the sale looks like now: its stock, its times, a pause. A page
   * drawn once showed the stock it loaded with for good: a "sold out" read
   * while the last claims were being stored (a failed one puts its code
   * back) stayed sold out, a pause or a start the organiser moved was never
   * seen. The list says all of it, and Nginx answers the whole crowd from
   * one cached copy a second. */
  const refresh = async () => {
    const r = await api('GET', '/act/list');
    if (!r.ok || mine !== navigation) return;
    let fresh = r.data.activities.find((x) => x.actId === a.actId);
    if (!fresh) {
      // The list leaves out ended sales: one ended early (or taken off)
      // is asked about on its own.
      const d = await api('GET', `/act/detail?actId=${encodeURIComponent(a.actId)}&claims=0`);
      if (!d.ok || mine !== navigation) return;
      fresh = d.data;
    }
    for (const k of ['startTime', 'endTime', 'paused', 'perUserLimit', 'remaining', 'claimed', 'closed']) a[k] = fresh[k];
    for (const tk of a.tickets) {
      const now = fresh.tickets.find((x) => x.ticketId === tk.ticketId);
      const cell = cells.get(tk.ticketId);
      if (!now || !cell) continue;
      tk.remaining = now.remaining;
      tk.total = now.total;
      cell.left.textContent = number(now.remaining);
      cell.total.textContent = number(now.total);
    }
    drawOpensAt();
  };
  // Every 4-8 s from ten minutes before the start, spread so a crowd does
  // not look at once; every minute before that; not while the tab is
  // hidden (it looks once it is shown again).
  const nextLook = () => {
    const far = start() - serverNow() > 600000;
    return steadyNow() + (far ? 60000 : 4000) + Math.random() * (far ? 30000 : 4000);
  };
  let refreshing = false;
  let nextRefresh = nextLook();
  // A session that ended while the page sat open (it lasts a day) is found
  // at a random moment 2-5 minutes before the start, not at the tap: the
  // fan logs in again before the crowd does. A page opened later than
  // that checked it as it loaded.
  const checkAt = 120000 + Math.random() * 180000;
  let sessionChecked = !loggedIn || start() - serverNow() <= checkAt;
  every(200, () => {
    const now = serverNow();
    const st = statusOf(a, now);
    if (st !== 'ended' && !refreshing && steadyNow() >= nextRefresh && !document.hidden) {
      refreshing = true;
      nextRefresh = nextLook();
      refresh().finally(() => { refreshing = false; });
    }
    if (!sessionChecked && start() - now <= checkAt) {
      sessionChecked = true;
      api('GET', `/act/detail?actId=${encodeURIComponent(a.actId)}&claims=0`).then((r) => {
        // api() forgot the token: drawn again, the grab is a way to log in.
        if (mine === navigation && !r.ok && RELOGIN.includes(r.error.code) && !button.dataset.busy) {
          sessionEnded = r.error.code;
          route();
        }
      });
    }
    badge.className = `badge ${st}`;
    badge.textContent = t(st);
    if (st !== shown) {
      if (shown !== null) said.textContent = t(st);
      if (st === 'ended' || shown === 'ended') drawOpensAt();
      shown = st;
    }
    if (st === 'upcoming') {
      countdown.textContent = countdownText(start() - now);
      caption.textContent = t('opensIn');
    } else if (st === 'open') {
      countdown.textContent = countdownText(end() - now);
      caption.textContent = t('closesIn');
    } else {
      countdown.textContent = '';
      caption.textContent = '';
    }
    if (!button.dataset.busy) button.disabled = st !== 'open' || (queue && !queue.admitted);
  });
  if (queue && loggedIn) waitingRoom(a, queue);
}

/** The waiting room: join (again: it keeps the place), then follow the
 * place on the event stream (an open stream keeps it), and unlock the grab
 * button when the turn comes (its claim token is then the pass). */
async function waitingRoom(a, queue) {
  const mine = navigation;
  const lottery = a.admission === 'lottery';
  const opens = Date.parse(a.queue.opensAt);
  const panel = queue.panel;
  // The pass's countdown, while the turn lasts.
  let passTick = null;
  // Whether the tab's title says "Your turn!": kept apart from
  // `queue.admitted`, which the pass's last tick turns off before the
  // room's answer is drawn (the title said "Your turn!" for good).
  let titled = false;
  // What a screen reader hears of the room: the state when it changes, and
  // the place at most every 30 s. The panel is drawn anew at each event,
  // and the status notices in it were new live regions each time ("Your
  // turn!" said again and again, or not at all).
  // The room is drawn into `content`; `said` stays in the panel throughout (a
  // live region taken out and put back as its text changes is often not
  // read).
  const said = h('p', { class: 'sr-only', id: 'queue-said', 'aria-live': 'polite' });
  const content = h('div');
  panel.replaceChildren(content, said);
  let saidState = null;
  let placeSaidAt = 0;
  const render = (s) => {
    queue.admitted = s.state === 'admitted';
    if (queue.admitted && !titled) {
      // The fan may be in another tab, or have put the phone down after a
      // long wait: the tab's title and a buzz say the turn has come. (A
      // page never tapped may not vibrate; it would only be refused.)
      titled = true;
      document.title = `${t('turnTitle')} ${a.name} · ${t('brand')}`;
      if (navigator.userActivation?.hasBeenActive) navigator.vibrate?.([200, 100, 200]);
    } else if (titled && !queue.admitted) {
      titled = false;
      document.title = `${a.name} · ${t('brand')}`;
    }
    clearInterval(passTick);
    panel.dataset.state = s.state;
    panel.dataset.placesLeft = String(s.placesLeft);
    const lines = [h('h2', {}, t(lottery ? 'lottery' : 'queue'))];
    if (s.state === 'waiting' && s.position == null) lines.push(notice('ok', t('joined'), ' ', t('drawNote')));
    if (s.state === 'waiting' && s.position != null) {
      lines.push(h('p', { class: 'countdown', id: 'queue-position' }, `${t('position')}${t('sep')}${number(s.position)}`),
        h('p', { class: 'muted' }, `${number(s.ahead)} ${t('ahead')}`,
          s.etaMs != null ? ` · ${t('eta')} ${countdownText(s.etaMs)}` : ''));
      // Standby in a lottery is not being drawn: "0 ahead of you" alone
      // read as being next.
      if (s.standby) lines.push(notice('', t(lottery ? 'notDrawn' : 'standby')));
    }
    if (s.state === 'admitted') {
      const expires = Date.parse(s.passExpiresAt);
      const left = h('p', { class: 'countdown', id: 'pass-left' });
      let asked = false;
      const tick = () => {
        left.textContent = `${t('passLeft')} ${countdownText(expires - serverNow())}`;
        // Out of time: the grab button goes off now, not when the stream
        // next speaks (a tap at 00:00:00 heard "wait for your turn"); and
        // the room is asked once, since a pass extended after a pause
        // changes nothing the stream tells.
        if (expires <= serverNow() && !asked) {
          asked = true;
          queue.admitted = false;
          api('GET', `/queue/status?actId=${encodeURIComponent(a.actId)}`).then((r) => {
            // Extended: the turn goes on. Retired: said. Else the stream
            // tells of the retirement, as it changes the state.
            const extended = r.ok && r.data.state === 'admitted' && Date.parse(r.data.passExpiresAt) > expires;
            if (mine === navigation && r.ok && panel.dataset.state === 'admitted'
              && (extended || r.data.state !== 'admitted')) render(r.data);
          });
        }
      };
      tick();
      timers.push(passTick = setInterval(tick, 500));
      lines.push(notice('ok', t('yourTurn'), ' ', when(expires)), left);
    }
    // A lottery takes no entry after its draw, and an account has a
    // number of places: with neither, nothing to join again.
    if (s.state === 'passed_over') {
      const last = s.placesLeft === 0;
      lines.push(notice('bad', t(lottery ? 'passedOverDrawn' : last ? 'passedOverLast' : 'passedOver')));
      if (!lottery && !last) lines.push(joinButton());
    }
    if (s.state === 'sold_out') lines.push(notice('bad', errorText({ code: 'SOLD_OUT' })));
    if (s.state === 'ended') lines.push(notice('bad', errorText({ code: 'ENDED' })));
    if (s.state === 'entries_closed') lines.push(notice('bad', t('entriesClosed')));
    // After a claim, mostly: said with the way to the codes ("Your turn is
    // over" alone read as a turn missed).
    if (s.state === 'done') lines.push(notice('', t('done'), ' ', h('a', { href: '#/mine' }, t('seeMine'))));
    lines.push(h('p', { class: 'muted small' }, `${t('commitment')}${t('sep')}`, h('code', {}, s.commitment)));
    if (s.seed) lines.push(h('p', { class: 'muted small' }, `${t('seed')}${t('sep')}`, h('code', {}, s.seed)));
    for (const line of lines) line.removeAttribute('role');
    const place = s.state === 'waiting' && s.position != null ? `${t('position')}${t('sep')}${number(s.position)}` : '';
    // The draw (a place given) and standby change what is said, not the state.
    const key = `${s.state}/${s.position == null}/${Boolean(s.standby)}`;
    if (key !== saidState) {
      saidState = key;
      placeSaidAt = steadyNow();
      said.textContent = lines.find((l) => l.classList.contains('notice'))?.textContent || place;
    } else if (place && steadyNow() - placeSaidAt >= 30000) {
      placeSaidAt = steadyNow();
      said.textContent = place;
    }
    content.replaceChildren(...lines);
  };
  const joinButton = () => {
    // The room's one action until the turn: as large to tap as the grab
    // (the browser's default button was 24 px tall on a phone).
    const b = h('button', { type: 'button', class: 'primary', id: 'join' }, t(lottery ? 'enterLottery' : 'joinQueue'));
    b.addEventListener('click', async () => {
      // Turned off, the button lets go of the focus (to the page).
      const focused = document.activeElement === b;
      b.disabled = true;
      const body = { actId: a.actId };
      // What the join is doing, in one place replaced at each try (each
      // failed tap added another notice).
      let note = content.querySelector('#join-note');
      if (!note) content.append(note = h('div', { id: 'join-note' }));
      // Joining again keeps a place already taken, so a join that met a
      // full or busy room, or got no answer (it may have taken the place,
      // which lapses after the room's grace unless checked in), is tried
      // again as the server asks, for as long as the fan stays here.
      for (let tries = 1; mine === navigation; tries++) {
        let res = await api('POST', '/queue/join', body);
        if (!res.ok && res.error.code === 'POW_REQUIRED' && res.error.powChallenge) {
          // The room asks each account to pay a little work for its place.
          const progress = h('progress', { id: 'join-pow', max: 1, value: 0, 'aria-label': t('pow') });
          note.replaceChildren(notice('', t('pow')), progress);
          try {
            body.powNonce = await solvePow(res.error.powChallenge, res.error.powDifficulty, progress);
          } catch {
            note.replaceChildren(notice('bad', errorText({ code: 'POW_REQUIRED' })));
            b.disabled = false;
            return;
          }
          if (mine !== navigation) return;
          res = await api('POST', '/queue/join', body);
        }
        if (mine !== navigation) return;
        if (res.ok) {
          // The button goes with the redraw: the focus it had goes to the
          // room, unless the fan moved it on meanwhile.
          const lost = [b, document.body, null].includes(document.activeElement);
          render(res.data);
          if (focused && lost) panel.focus();
          follow();
          return;
        }
        if (RELOGIN.includes(res.error.code)) { content.replaceChildren(loginPrompt(res.error.code)); return; }
        if (!retryable(res)) { note.replaceChildren(notice('bad', errorText(res.error))); b.disabled = false; return; }
        const ms = retryDelay(res.retryAfter, tries);
        note.replaceChildren(retryingNotice(res, ms));
        await sleep(ms);
      }
    });
    return b;
  };
  let following = false;
  // Passed over is final too in a lottery (no entry after its draw) and
  // with no place left (as QueueStatus::nothing_to_wait_for says).
  const ended = () => ['sold_out', 'ended', 'entries_closed', 'done'].includes(panel.dataset.state)
    || (panel.dataset.state === 'passed_over' && (lottery || panel.dataset.placesLeft === '0'));
  const follow = async () => {
    if (following) return;
    following = true;
    try { await stream(); } finally { following = false; }
  };
  const stream = async () => {
    for (let tries = 1; mine === navigation;) {
      const abort = new AbortController();
      streams.push(abort);
      let retryAfter = 0;
      // Silence, before the answer's head or between its events, ends the
      // stream: the next one is opened below.
      let heard = steadyNow();
      const silence = setInterval(() => { if (steadyNow() - heard > STREAM_SILENCE_MS) abort.abort(); }, 1000);
      try {
        const res = await fetch(`/queue/events?actId=${encodeURIComponent(a.actId)}`,
          { headers: { Authorization: `Bearer ${store.token}` }, signal: abort.signal });
        heard = steadyNow();
        retryAfter = Number(res.headers.get('Retry-After')) || 0;
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        tries = 1;
        const reader = res.body.getReader();
        const text = new TextDecoder();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          heard = steadyNow();
          buffer += text.decode(value, { stream: true });
          for (let end; (end = buffer.indexOf('\n\n')) >= 0; buffer = buffer.slice(end + 2)) {
            const data = buffer.slice(0, end).split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('');
            if (data) render(JSON.parse(data));
          }
        }
      } catch { /* reconnect below */ } finally {
        clearInterval(silence);
      }
      if (mine !== navigation || ended()) return;
      // Between streams (refused, cut, or its node draining) the place is
      // kept by checking in every second, as a stream does (a room's grace
      // may be as short as 3 s); a status also tells a fan whose session is
      // gone to log in again. The next stream waits as the server asked,
      // with jitter, so the fans of a draining node do not all come back
      // at once.
      const next = steadyNow() + retryDelay(retryAfter, tries++);
      for (;;) {
        const now = await api('GET', `/queue/status?actId=${encodeURIComponent(a.actId)}`);
        if (mine !== navigation) return;
        if (!now.ok && RELOGIN.includes(now.error.code)) return content.replaceChildren(loginPrompt(now.error.code));
        if (now.ok && now.data.state === 'not_joined') {
          saidState = null;
          return content.replaceChildren(h('h2', {}, t(lottery ? 'lottery' : 'queue')), joinButton());
        }
        if (now.ok) render(now.data);
        if (ended()) return;
        if (steadyNow() >= next) break;
        await sleep(Math.min(1000, next - steadyNow()));
      }
    }
  };
  const first = await load(`/queue/status?actId=${encodeURIComponent(a.actId)}`, mine);
  if (mine !== navigation) return;
  // Not knowing the state is no reason to lose the way in: joining again
  // keeps a place already taken.
  if (!first.ok) return content.replaceChildren(notice('bad', errorText(first.error)), joinButton());
  if (first.data.state !== 'not_joined') { render(first.data); return follow(); }
  if (serverNow() < opens) {
    const line = h('p', { class: 'muted' });
    content.replaceChildren(line);
    every(500, () => { line.textContent = `${t('queueOpensIn')} ${countdownText(opens - serverNow())}`; });
    await sleep(Math.max(0, opens - serverNow()) + 200);
    if (mine !== navigation) return;
  }
  // After the draw a queue takes newcomers at the back: "joining early
  // gives no advantage" was a promise to those who joined before it.
  // (A lottery drawn takes no entry: it shows entries closed instead.)
  const drawn = !lottery && serverNow() >= Date.parse(first.data.shuffleAt);
  content.replaceChildren(h('h2', {}, t(lottery ? 'lottery' : 'queue')),
    h('p', { class: 'muted', id: 'join-rules' }, t(drawn ? 'lateNote' : 'drawNote')), joinButton());
}

function codesList(codes) {
  return h('ul', { class: 'codes' }, codes.map((c) => h('li', { class: 'code' }, c)));
}

/** Asks the worker for a proof of work; shows its progress. */
function solvePow(challenge, difficulty, progress) {
  return new Promise((resolve, reject) => {
    const worker = new Worker(POW_WORKER);
    progress.hidden = false;
    progress.value = 0;
    worker.onmessage = ({ data }) => {
      if (data.done) {
        progress.value = 1;
        worker.terminate();
        resolve(data.nonce);
      } else {
        // Tries grow past the expectation sometimes: approach 1, never reach it.
        progress.value = 1 - Math.exp(-data.tries / data.expected);
      }
    };
    worker.onerror = (e) => { worker.terminate(); reject(e); };
    worker.postMessage({ challenge, difficulty });
  });
}

/** The grab: claim token, proof of work, the claim; retries only as the server says. */
async function grab(a, ticketId, button, progress, result) {
  button.dataset.busy = '1';
  // Turned off, the button drops the focus: a fan on the keyboard goes on
  // from the answer, not from the top of the page.
  if (document.activeElement === button) result.focus();
  button.disabled = true;
  // The language switch redraws the page: mid-grab, the code or the error
  // went to a view no longer shown, and the fan saw a grab button again.
  const langSwitch = document.getElementById('lang');
  langSwitch.disabled = true;
  button.textContent = t('grabbing');
  // One key for every retry, and for the next grab while this one's outcome
  // is unknown: a retry can never claim twice.
  let resumed = claimKeys.pending(a.actId);
  const key = claimKeys.take(a.actId);
  let settled = false;
  const got = (res) => {
    settled = true;
    claimKeys.settle(a.actId);
    result.replaceChildren(notice('ok', h('p', {}, t('success')),
      h('p', { class: 'code', id: 'claimed-code' }, res.data.code), h('a', { href: '#/mine' }, t('seeMine'))));
  };
  let body = null;
  try {
    if (!store.token) return result.replaceChildren(loginPrompt('UNAUTHORIZED'));
    for (let tries = 1; tries <= MAX_TRIES; tries++) {
      if (!body) {
        // `claims=0`: only the token is needed here; the claims would cost
        // a cluster a Redis read on every grab.
        const detail = await api('GET', `/act/detail?actId=${encodeURIComponent(a.actId)}&claims=0`);
        if (!detail.ok && retryable(detail) && tries < MAX_TRIES) {
          const ms = retryDelay(detail.retryAfter, tries);
          result.replaceChildren(retryingNotice(detail, ms));
          await sleep(ms);
          continue;
        }
        if (!detail.ok && RELOGIN.includes(detail.error.code)) return result.replaceChildren(loginPrompt(detail.error.code));
        if (!detail.ok) return result.replaceChildren(failedNotice(detail.error, retryable(detail)));
        a = detail.data;
        // The session ended (here or in another tab): no token, no verdict.
        if (!store.token || a.accountAdmitted === undefined) return result.replaceChildren(loginPrompt('UNAUTHORIZED'));
        // An account the activity does not admit has no token either: its
        // claim goes out without one, for the server to say why.
        if (!a.claimToken && a.accountAdmitted !== false) {
          // The node says the sale has not started, though this page's
          // clock said it had (the device's clock stepped since the page
          // loaded, or this node is a moment behind the one that set the
          // clock): wait for the start by the node's own time, then ask
          // again, rather than give up at the opening.
          const early = Date.parse(a.startTime) - Date.parse(a.serverTime);
          if (early > 0 && early <= 10000 && !a.paused && tries < MAX_TRIES) {
            result.replaceChildren(notice('', `${t('opensIn')} ${countdownText(early)}`));
            await sleep(early + Math.random() * 250);
            continue;
          }
          const status = statusOf(a, serverNow());
          // A waiting room's sale that is open gives a token only with a
          // pass: this node may not have seen the admission yet (another
          // node's replica told the page), so ask again briefly; then the
          // words are the room's, not "not started".
          const roomOpen = a.admission && a.admission !== 'race' && status === 'open';
          if (roomOpen && tries < 3) { await sleep(400 + Math.random() * 400); continue; }
          const code = { soldout: 'SOLD_OUT', paused: 'PAUSED', ended: 'ENDED', closed: 'CLOSED' }[status]
            || (roomOpen ? 'QUEUE_PASS_REQUIRED' : 'NOT_STARTED');
          if (resumed) {
            // An earlier grab's answer was lost: it may hold the ticket that
            // sold the sale out. Its key asks (no claim token needed for that).
            resumed = false;
            const res = await api('POST', '/ticket/get', { actId: a.actId }, { 'Idempotency-Key': key });
            if (res.ok) return got(res);
          }
          return result.replaceChildren(notice('bad', errorText({ code })));
        }
        body = { actId: a.actId, claimToken: a.claimToken };
        if (ticketId) body.ticketId = ticketId;
        if (a.powDifficulty > 0 && a.claimToken) {
          result.replaceChildren(notice('', t('pow')));
          try {
            body.powNonce = await solvePow(a.claimToken, a.powDifficulty, progress);
          } catch {
            // The puzzle's worker did not load (a flaky connection at the
            // opening, a page from before an upgrade): tried again as after
            // a lost request. Uncaught, it left "Solving…" and no word.
            body = null;
            const lost = { error: { code: 'NETWORK', message: '' }, retryAfter: 0 };
            if (tries === MAX_TRIES) return result.replaceChildren(failedNotice(lost.error, true));
            const ms = retryDelay(0, tries);
            result.replaceChildren(retryingNotice(lost, ms));
            await sleep(ms);
            continue;
          }
        }
      }
      const res = await api('POST', '/ticket/get', body, { 'Idempotency-Key': key });
      if (res.ok) return got(res);
      const code = res.error.code;
      if (code === 'LIMIT_REACHED') {
        return result.replaceChildren(notice('bad', h('p', {}, errorText(res.error)), h('p', {}, t('yourCodes')),
          codesList(res.error.codes || [])));
      }
      if (code === 'IDEMPOTENCY_KEY_REUSED') {
        // The lost grab got a ticket of another type: it is in "my tickets".
        claimKeys.settle(a.actId);
        return result.replaceChildren(notice('ok', t('gotEarlier'), ' ', h('a', { href: '#/mine' }, t('seeMine'))));
      }
      if (code.startsWith('CLAIM_TOKEN') || code === 'POW_REQUIRED') { body = null; continue; }
      // Not started by this node's clock: its detail says how long to wait.
      if (code === 'NOT_STARTED' && tries < MAX_TRIES) { body = null; await sleep(200 + Math.random() * 300); continue; }
      if (RELOGIN.includes(code)) return result.replaceChildren(loginPrompt(code));
      if (!retryable(res)) {
        // One ticket type of several sold out: the others may not be.
        const one = code === 'SOLD_OUT' && ticketId && a.tickets.length > 1;
        return result.replaceChildren(notice('bad', one ? t('typeSoldOut') : errorText(res.error)));
      }
      if (tries === MAX_TRIES) return result.replaceChildren(failedNotice(res.error, true));
      const ms = retryDelay(res.retryAfter, tries);
      result.replaceChildren(retryingNotice(res, ms));
      await sleep(ms);
    }
    result.replaceChildren(notice('bad', errorText({ code: 'CLAIM_TOKEN_EXPIRED' })));
  } finally {
    progress.hidden = true;
    const done = () => { delete button.dataset.busy; button.textContent = t('grab'); };
    if (settled) setTimeout(done, GRAB_SETTLE_MS); else done();
    langSwitch.disabled = false;
  }
}

function accountView(mode) {
  // A view of this page only: `next` goes to location.replace, where
  // `?next=https://…` would leave the site.
  const asked = new URLSearchParams(location.hash.split('?')[1] || '').get('next');
  const next = asked && asked.startsWith('#/') ? asked : '#/';
  document.title = `${t(mode)} · ${t('brand')}`;
  const message = h('div', { id: 'form-message' });
  const field = (name, type, label, extra = {}) => h('label', {}, label,
    h('input', { name, type, id: `f-${name}`, required: name !== 'nickname', ...extra }));
  const form = h('form', { class: 'account', id: `${mode}-form` },
    // The server counts 3-32 characters after normalising (and takes up to
    // 256 bytes as typed): a name typed decomposed is longer here.
    field('username', 'text', t('username'), { autocomplete: 'username', minlength: 3, maxlength: 128, autocapitalize: 'none' }),
    field('password', 'password', t('password'),
      { autocomplete: mode === 'login' ? 'current-password' : 'new-password', minlength: 8, maxlength: 128 }),
    mode === 'register' ? field('nickname', 'text', t('nickname'), { maxlength: 32 }) : null,
    h('button', { type: 'submit', class: 'primary' }, t(mode)),
    message);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const data = Object.fromEntries(new FormData(form));
    if (!data.nickname) delete data.nickname;
    const submit = form.querySelector('button');
    submit.disabled = true;
    try {
      for (let tries = 1; ; tries++) {
        const res = await api('POST', `/user/${mode}`, data);
        if (res.ok) {
          store.token = res.data.token;
          renderNav();
          // In place of the form: "back" showed the form to a fan logged in.
          location.replace(next);
          return;
        }
        if (res.retryAfter > 30) {
          // Not worth sitting through with the button dead (a registration
          // limit answers in minutes): say when.
          message.replaceChildren(notice('bad', `${errorText(res.error)} ${t('tryAgainIn')} ${countdownText(res.retryAfter * 1000)}`));
          return;
        }
        // A registration whose answer was lost may have made the account:
        // a retry would be told the name is taken. The fan logs in instead.
        const unknown = mode === 'register' && (res.status === 0 || res.status >= 500) && res.error.code !== 'BUSY';
        if (!retryable(res) || unknown || tries === MAX_TRIES) {
          message.replaceChildren(failedNotice(res.error, retryable(res) && !unknown));
          return;
        }
        const ms = retryDelay(res.retryAfter, tries);
        message.replaceChildren(retryingNotice(res, ms));
        await sleep(ms);
      }
    } finally {
      submit.disabled = false;
    }
  });
  const other = mode === 'login' ? ['#/register', t('noAccount')] : ['#/login', t('haveAccount')];
  // The other form in place of this one: "back" after logging in from
  // either must not find a form.
  const switchTo = h('a', { href: `${other[0]}?next=${encodeURIComponent(next)}` }, other[1]);
  switchTo.addEventListener('click', (e) => { e.preventDefault(); location.replace(switchTo.getAttribute('href')); });
  show(h('h1', {}, t(mode)), form, h('p', {}, switchTo));
  form.querySelector('input').focus();
}

/** The most claims `/ticket/list` gives in one page. */
const LIST_PAGE = 100;

async function mineView() {
  document.title = `${t('mine')} · ${t('brand')}`;
  if (!store.token) { location.replace('#/login?next=%23%2Fmine'); return; }
  const mine = navigation;
  show(h('p', { class: 'muted' }, t('loading')));
  // Every page: a fan may hold more than one (a per-user limit goes up to
  // 1,000, and the list covers every activity); the first page alone hid
  // the rest. A claim made meanwhile moves the pages along, so a claim met
  // twice is shown once.
  const claims = [];
  const seen = new Set();
  // A page the node could not read whole (a cluster's MongoDB, for past
  // sales) says so: the fan is told, not shown fewer tickets as if all.
  let partial = false;
  for (let page = 1; ; page++) {
    const res = await load(`/ticket/list?pageSize=${LIST_PAGE}&page=${page}`, mine, stillLoading);
    if (mine !== navigation) return;
    // An ended session: the way to log in and back here (at the gate, this
    // is the one page a fan needs; it said only that the session ended).
    if (!res.ok && RELOGIN.includes(res.error.code)) return show(loginPrompt(res.error.code));
    if (!res.ok) return show(failedNotice(res.error, retryable(res), 'reload'));
    partial ||= res.data.partial === true;
    for (const c of res.data.claims) {
      if (!seen.has(c.claimId)) { seen.add(c.claimId); claims.push(c); }
    }
    if (res.data.claims.length < LIST_PAGE || page * LIST_PAGE >= res.data.total) break;
  }
  const cards = claims.map((c) => {
    const qr = h('img', { alt: `QR ${c.code}`, class: 'qr', 'data-claim': c.claimId });
    loadQr(c.claimId, qr);
    return h('li', { class: 'card ticket' },
      // By name; an activity no longer configured has only its ids.
      h('div', {}, h('p', { class: 'muted what' }, h('bdi', {}, c.actName ?? c.actId), ' · ', h('bdi', {}, c.ticketName ?? c.ticketId)),
        h('p', { class: 'code' }, c.code),
        h('p', { class: 'muted' }, `${t('claimedAt')} ${when(Date.parse(c.claimedAt))}`)),
      qr);
  });
  show(h('h1', {}, t('mine')),
    partial ? notice('bad', t('partialList')) : null,
    cards.length ? h('ul', { class: 'cards tickets' }, cards) : h('p', { class: 'muted' }, t('noTickets')));
}

/** The QR is drawn by the node and only for its owner: fetched with the token, shown from a blob. */
async function loadQr(claimId, img) {
  try {
    // A node rations a cluster's reads per user (429 with Retry-After): a
    // fan with many tickets gets the rest of the QR codes a moment later.
    for (let tries = 1; tries <= MAX_TRIES; tries++) {
      const res = await fetch(`/ticket/qr?ticketId=${claimId}`, { headers: { Authorization: `Bearer ${store.token}` } });
      if (res.status === 429 && tries < MAX_TRIES) {
        await sleep(retryDelay(Number(res.headers.get('Retry-After')) || 0, tries));
        continue;
      }
      if (!res.ok) return;
      img.src = URL.createObjectURL(await res.blob());
      return;
    }
  } catch { /* the code is shown as text anyway */ }
}

// ---------------------------------------------------------------- frame
function renderNav() {
  const loggedIn = Boolean(store.token);
  document.getElementById('nav-mine').hidden = !loggedIn;
  document.getElementById('nav-login').hidden = loggedIn;
  document.getElementById('nav-logout').hidden = !loggedIn;
  // The button names the other language, in that language.
  const other = document.getElementById('lang');
  other.textContent = lang === 'zh' ? 'English' : '中文';
  other.lang = lang === 'zh' ? 'en' : 'zh-CN';
  document.documentElement.lang = lang === 'zh' ? 'zh-CN' : 'en';
  for (const el of document.querySelectorAll('[data-t]')) el.textContent = t(el.dataset.t);
}

function route() {
  navigation += 1;
  const [path] = location.hash.replace(/^#/, '').split('?');
  const act = path.match(/^\/act\/(.+)$/);
  if (act) {
    // A hand-made `#/act/%zz` is no reason to stay on "…": the id as typed
    // goes to the server, which says there is no such activity.
    let id = act[1];
    try { id = decodeURIComponent(id); } catch { /* as typed */ }
    return detailView(id);
  }
  if (path === '/login') return accountView('login');
  if (path === '/register') return accountView('register');
  if (path === '/mine') return mineView();
  return listView();
}

document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('lang').addEventListener('click', () => {
    lang = lang === 'zh' ? 'en' : 'zh';
    localStorage.setItem('ticketd.lang', lang);
    renderNav();
    route();
  });
  document.getElementById('nav-logout').addEventListener('click', async () => {
    const res = await api('POST', '/user/logout');
    // Refused (the store could not keep it) or unanswered, the session may
    // still be good on the server: the fan hears so, rather than seeing a
    // logout that may not have happened, and can press again. (A session
    // already gone: api() dropped the token, and the fan is logged out.)
    if (!res.ok && !RELOGIN.includes(res.error.code)) {
      document.getElementById('logout-failed')?.remove();
      const said = notice('bad', `${t('logoutFailed')} ${errorText(res.error)}`);
      said.id = 'logout-failed';
      view().prepend(said);
      return;
    }
    store.token = null;
    renderNav();
    location.hash = '#/';
  });
  // The new view gets the focus, unless it gave it to one of its own (the
  // login form's first field: it was taken back).
  window.addEventListener('hashchange', () => {
    route();
    if (!view().contains(document.activeElement)) view().focus();
  });
  // Logged in or out in another tab: this one's header and view follow
  // (the view once a grab in progress here has its answer: redrawn
  // mid-grab, the code would go to a view no longer shown).
  window.addEventListener('storage', (e) => {
    if (e.key !== 'ticketd.token') return;
    renderNav();
    if (!document.querySelector('[data-busy]')) route();
  });
  renderNav();
  route();
});
