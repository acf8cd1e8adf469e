/// Parley Work's Buildbot front end (issue 12): unmodified `buildbot-worker`s connect over
/// WebSocket (msgpack_experimental_v7) and run the store's jobs and the master's commands.
public enum BuildbotFrontEnd {}
