/// Parley Work's BOINC front end (issue 12): the master page, the scheduler RPC (XML over
/// HTTP POST), the file upload handler and the downloads of inputs and apps, on the same job
/// store as native workers. Built in its own module so that `parley work serve --boinc` stays
/// a thin option.
public enum BOINCFrontEnd {}
