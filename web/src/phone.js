// crossbar softphone: login for short-lived SIP credentials, then JsSIP over
// WebSocket (RFC 7118) with WebRTC media. The password is sent once to the
// login API and never kept; the SIP credentials live in memory only.
import JsSIP from 'jssip/lib/JsSIP';

const $ = (id) => document.getElementById(id);
const state = { ua: null, session: null, creds: null, timer: null, started: 0 };
window.phone = state; // for tests and debugging: window.phone.session.connection.getStats()

function setReg(kind, text) {
  document.body.dataset.reg = kind;
  const r = $('reg');
  r.textContent = text;
  r.className = 'reg ' + (kind === 'registered' ? 'on' : kind === 'logged-out' || kind === 'failed' ? 'off' : '');
}

function setCall(kind) {
  document.body.dataset.call = kind;
  $('incoming').hidden = kind !== 'ringing';
  $('active').hidden = !(kind === 'in-call' || kind === 'calling');
  $('call-state').textContent = kind === 'calling' ? 'Calling…' : 'In call';
  if (kind === 'idle') {
    $('mute').setAttribute('aria-pressed', 'false');
    $('hold').setAttribute('aria-pressed', 'false');
    clearInterval(state.timer);
    $('timer').textContent = '00:00';
  }
}

function userOf(identity) {
  if (!identity) return '';
  const name = identity.display_name;
  const user = identity.uri && identity.uri.user;
  return name && name !== user ? `${name} (${user})` : user || '';
}

// The tenant is the subdomain: acme.localhost:8080 → acme.
$('tenant').textContent = location.hostname.split('.')[0];

$('login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('login-error').textContent = '';
  const body = JSON.stringify({ username: $('username').value.trim(), password: $('password').value });
  $('password').value = '';
  let resp, data;
  try {
    resp = await fetch('/api/v1/softphone/login', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body });
    data = await resp.json();
  } catch (e) {
    $('login-error').textContent = 'Cannot reach the server.';
    return;
  }
  if (!resp.ok) {
    const code = data && data.error ? data.error.code : 'error';
    $('login-error').textContent = (data && data.error && data.error.message) || 'Sign-in failed.';
    $('login-error').dataset.code = code;
    return;
  }
  start(data);
});

function start(creds) {
  state.creds = creds;
  $('login').hidden = true;
  $('phone').hidden = false;
  $('me-name').textContent = creds.display_name || '';
  $('me-ext').textContent = 'ext. ' + (creds.extension || creds.sip_uri);
  setReg('connecting', 'Connecting…');
  const socket = new JsSIP.WebSocketInterface(creds.ws_url);
  const ua = new JsSIP.UA({
    sockets: [socket],
    uri: creds.sip_uri,
    authorization_user: creds.sip_username,
    password: creds.sip_password,
    display_name: creds.display_name,
    register: true,
    register_expires: 600,
    session_timers: false,
    user_agent: 'crossbar-softphone',
  });
  state.ua = ua;
  ua.on('connected', () => setReg('connecting', 'Registering…'));
  ua.on('disconnected', () => setReg('failed', 'Disconnected'));
  ua.on('registered', () => setReg('registered', 'Registered'));
  ua.on('unregistered', () => setReg('unregistered', 'Not registered'));
  ua.on('registrationFailed', (e) => setReg('failed', 'Registration failed: ' + (e.cause || '')));
  ua.on('newRTCSession', (e) => onSession(e.session, e.request, e.originator));
  ua.start();
}

function onSession(session, request, originator) {
  if (state.session) {
    if (originator === 'remote') session.terminate({ status_code: 486, reason_phrase: 'Busy Here' });
    return;
  }
  state.session = session;
  if (originator === 'remote') {
    $('caller').textContent = userOf(session.remote_identity) || 'Unknown caller';
    const called = request.getHeader('P-Called-Party-ID');
    const did = called && (called.match(/sip:\+?([^@;>]+)/) || [])[1];
    $('did').textContent = did ? `on ${did}` : '';
    $('did').dataset.did = did || '';
    $('peer').textContent = $('caller').textContent;
    setCall('ringing');
  } else {
    $('peer').textContent = userOf(session.remote_identity);
    setCall('calling');
  }
  const attach = () => {
    const pc = session.connection;
    if (!pc) return;
    pc.addEventListener('track', (ev) => { $('remote-audio').srcObject = ev.streams[0] || new MediaStream([ev.track]); });
  };
  if (session.connection) attach(); else session.on('peerconnection', attach);
  session.on('confirmed', () => {
    setCall('in-call');
    state.started = Date.now();
    clearInterval(state.timer);
    state.timer = setInterval(() => {
      const s = Math.floor((Date.now() - state.started) / 1000);
      $('timer').textContent = `${String(Math.floor(s / 60)).padStart(2, '0')}:${String(s % 60).padStart(2, '0')}`;
    }, 1000);
  });
  const done = () => { state.session = null; setCall('idle'); };
  session.on('ended', done);
  session.on('failed', done);
}

const callOptions = () => ({
  mediaConstraints: { audio: true, video: false },
  pcConfig: { iceServers: (state.creds && state.creds.ice_servers) || [] },
  rtcOfferConstraints: { offerToReceiveAudio: true, offerToReceiveVideo: false },
});

$('answer').addEventListener('click', () => state.session && state.session.answer(callOptions()));
$('reject').addEventListener('click', () => state.session && state.session.terminate({ status_code: 486, reason_phrase: 'Busy Here' }));
$('hangup').addEventListener('click', () => state.session && state.session.terminate());
$('mute').addEventListener('click', (ev) => {
  const s = state.session; if (!s) return;
  const muted = s.isMuted().audio;
  if (muted) s.unmute({ audio: true }); else s.mute({ audio: true });
  ev.currentTarget.setAttribute('aria-pressed', String(!muted));
});
$('hold').addEventListener('click', (ev) => {
  const s = state.session; if (!s) return;
  const held = s.isOnHold().local;
  if (held) s.unhold(); else s.hold();
  ev.currentTarget.setAttribute('aria-pressed', String(!held));
});
$('keypad').addEventListener('click', (ev) => {
  const b = ev.target.closest('button'); if (!b) return;
  if (state.session && state.session.isEstablished()) {
    state.session.sendDTMF(b.textContent, { transportType: 'RFC2833' });
  } else {
    $('number').value += b.textContent;
  }
});
$('dial-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const n = $('number').value.trim();
  if (!n || !state.ua || state.session) return;
  const domain = state.creds.sip_uri.split('@')[1];
  state.ua.call(`sip:${n}@${domain}`, callOptions());
});
$('logout').addEventListener('click', () => {
  if (state.ua) state.ua.stop();
  state.ua = null; state.creds = null;
  $('phone').hidden = true; $('login').hidden = false;
  setReg('logged-out', 'Signed out');
});
