// The classic echo server from the nginx WebSocket tutorial (docs/seed-scenario.md).
// One change: it binds 127.0.0.1 instead of every interface, so the scenario stays on
// loopback. `node server.js` listens on 127.0.0.1:8010 and answers every message with
// "Server received from client: <message>".
console.log("Server started");
var Msg = '';
var WebSocketServer = require('ws').Server
  , wss = new WebSocketServer({host: '127.0.0.1', port: 8010});
wss.on('connection', function(ws) {
  ws.on('message', function(message) {
    console.log('Received from client: %s', message);
    ws.send('Server received from client: ' + message);
  });
});
